"""Independent plain-PyTorch references for the models and the preprocessing.

Written without fastfeat's layer list: torchvision's own AlexNet and VGG-16 classes
for ``alexnet`` and ``vgg16``, and an nn.Sequential transcription of Caffe's
deploy.prototxt for ``caffenet``, with Caffe's LRN written out from its formula.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


class CaffeLRN(nn.Module):
    """b_c = a_c / (k + alpha/n * sum_{c' in window(c)} a_c'^2)^beta, window of n centred on c."""

    def __init__(self, n=5, alpha=1e-4, beta=0.75, k=1.0):
        super().__init__()
        self.n, self.alpha, self.beta, self.k = n, alpha, beta, k

    def forward(self, x):
        sq = F.pad(x.pow(2), (0, 0, 0, 0, self.n // 2, self.n // 2))  # pad channels
        window = sum(sq[:, i : i + x.shape[1]] for i in range(self.n))
        return x / (self.k + self.alpha / self.n * window).pow(self.beta)


class RefCaffeNet(nn.Module):
    """BVLC reference CaffeNet deploy net.  Returns every blob by Caffe-style name."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        self.fc6 = nn.Linear(9216, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, 1000)
        self.lrn = CaffeLRN()

    def forward(self, x):
        out = {}
        pool = lambda t: F.max_pool2d(t, 3, 2, ceil_mode=True)
        out["relu1"] = F.relu(self.conv1(x))
        out["norm1"] = self.lrn(pool(out["relu1"]))
        out["relu2"] = F.relu(self.conv2(out["norm1"]))
        out["norm2"] = self.lrn(pool(out["relu2"]))
        out["relu3"] = F.relu(self.conv3(out["norm2"]))
        out["relu4"] = F.relu(self.conv4(out["relu3"]))
        out["pool5"] = pool(F.relu(self.conv5(out["relu4"])))
        out["fc6"] = self.fc6(out["pool5"].flatten(1))
        out["relu6"] = F.relu(out["fc6"])
        out["fc7"] = self.fc7(out["relu6"])
        out["relu7"] = F.relu(out["fc7"])
        out["fc8"] = self.fc8(out["relu7"])
        return out


class RefAlexNet(nn.Module):
    """torchvision.models.alexnet with taps at relu6/relu7/fc8/pool5."""

    def __init__(self):
        super().__init__()
        from torchvision.models import alexnet

        self.net = alexnet(weights=None)

    def load_state_dict(self, state, strict=True):
        return self.net.load_state_dict(state, strict=strict)

    def forward(self, x):
        out = {}
        feats = self.net.features(x)
        out["pool5"] = feats
        h = self.net.avgpool(feats).flatten(1)
        c = self.net.classifier  # Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear
        out["fc6"] = c[1](h)
        out["relu6"] = F.relu(out["fc6"])
        out["fc7"] = c[4](out["relu6"])
        out["relu7"] = F.relu(out["fc7"])
        out["fc8"] = c[6](out["relu7"])
        return out


class RefVGG16(nn.Module):
    """torchvision.models.vgg16 (configuration D) with taps at every pool, conv5_3, relu5_3 and the fc layers.

    Runs torchvision's own ``features``, ``avgpool`` and ``classifier`` modules; the taps are read off
    by module index (torchvision's numbering, not fastfeat's layer list).
    """

    # torchvision ``features`` index -> tap name (indices of the MaxPool2d modules, and of conv5_3/relu5_3).
    FEATURE_TAPS = {4: "pool1", 9: "pool2", 16: "pool3", 23: "pool4", 28: "conv5_3", 29: "relu5_3", 30: "pool5"}

    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16

        self.net = vgg16(weights=None)

    def load_state_dict(self, state, strict=True):
        return self.net.load_state_dict(state, strict=strict)

    def forward(self, x):
        out = {}
        h = x
        for i, module in enumerate(self.net.features):
            if isinstance(module, nn.ReLU):
                h = F.relu(h)  # torchvision's ReLUs are in place: never overwrite a tapped conv output
            else:
                h = module(h)
            if i in self.FEATURE_TAPS:
                out[self.FEATURE_TAPS[i]] = h
        h = self.net.avgpool(h).flatten(1)  # AdaptiveAvgPool2d((7, 7)): identity on pool5's 7×7 map
        c = self.net.classifier  # Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
        out["fc6"] = c[0](h)
        out["relu6"] = F.relu(out["fc6"])
        out["fc7"] = c[3](out["relu6"])
        out["relu7"] = F.relu(out["fc7"])
        out["fc8"] = c[6](out["relu7"])
        return out


REFERENCES: dict[str, type[nn.Module]] = {"caffenet": RefCaffeNet, "alexnet": RefAlexNet, "vgg16": RefVGG16}


def reference_model(name: str, state: dict) -> nn.Module:
    try:
        net = REFERENCES[name]()
    except KeyError:
        raise ValueError(f"no reference model for {name!r}; tests/reference.py has {', '.join(REFERENCES)}") from None
    net.load_state_dict(state)
    return net.eval()


# The models preprocessed as torchvision's ImageNet classifiers are (shorter side 256, centre crop 224).
TORCHVISION_STYLE = ("alexnet", "vgg16")


def reference_preprocess(path: str, model: str) -> torch.Tensor:
    """PIL/torch preprocessing, NHWC float32 [1, S, S, 3], independent of DALI."""
    if model != "caffenet" and model not in TORCHVISION_STYLE:
        raise ValueError(f"no reference preprocessing for {model!r}")
    img = Image.open(path)
    img = img.convert("RGB")
    a = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]  # 1,3,H,W RGB 0..255
    if model == "caffenet":
        a = F.interpolate(a, size=(256, 256), mode="bilinear", align_corners=False, antialias=False)
        crop, mean, std = 227, torch.tensor([104.0, 117.0, 123.0]), torch.ones(3)
        a = a.flip(1)  # RGB -> BGR
    else:
        from torchvision.transforms.v2 import functional as TF

        a = TF.center_crop(TF.resize(a, 256, antialias=True), 224)  # torchvision's own Resize + CenterCrop
        crop = 224
        mean = torch.tensor([0.485, 0.456, 0.406]) * 255
        std = torch.tensor([0.229, 0.224, 0.225]) * 255
    if model == "caffenet":  # Caffe's DataTransformer: offset (256 - 227) / 2 in integer arithmetic
        a = a[..., 14 : 14 + crop, 14 : 14 + crop]
    a = (a - mean[None, :, None, None]) / std[None, :, None, None]
    return a.permute(0, 2, 3, 1).contiguous()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
