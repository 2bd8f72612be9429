"""Independent plain-PyTorch references for the models and the preprocessing.

Written without fastfeat's layer list: torchvision's own AlexNet and VGG-16 classes
for ``alexnet`` and ``vgg16``, and transcriptions of the released deploy.prototxt for
``caffenet`` and CNN-F/M/M-2048/S, and of jhjin/overfeat-torch run.lua for OverFeat,
with Caffe's LRN written out from its formula.
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


class _CaffeStyleNet(nn.Module):
    """Shared by the transcriptions below: nn.Conv2d / nn.Linear modules named as the released layers, so the
    state dict keyed conv1.weight … fc8.bias loads into them unchanged."""

    def _fc_head(self, out: dict, x: torch.Tensor) -> dict:
        out["fc6"] = self.fc6(x.flatten(1))
        out["relu6"] = F.relu(out["fc6"])
        out["fc7"] = self.fc7(out["relu6"])
        out["relu7"] = F.relu(out["fc7"])
        out["fc8"] = self.fc8(out["relu7"])
        return out


class _TwoNormNet(_CaffeStyleNet):
    """CNN-F's and CNN-M's shared wiring (their deploy prototxts): conv→ReLU→LRN→pool twice, conv3-5 with
    ReLUs, pool5; every pool 3/2 in Caffe's ceil mode.  The subclasses give the layers' sizes."""

    def forward(self, x):
        out = {}
        pool = lambda t: F.max_pool2d(t, 3, 2, ceil_mode=True)
        out["norm1"] = self.lrn(F.relu(self.conv1(x)))
        out["pool1"] = pool(out["norm1"])
        out["norm2"] = self.lrn(F.relu(self.conv2(out["pool1"])))
        out["pool2"] = pool(out["norm2"])
        h = F.relu(self.conv4(F.relu(self.conv3(out["pool2"]))))
        out["pool5"] = pool(F.relu(self.conv5(h)))
        return self._fc_head(out, out["pool5"])


class RefCNNF(_TwoNormNet):
    """VGG_CNN_F deploy.prototxt (ksimonyan gist a32c9063ec8e1118221a): conv→ReLU→LRN→pool, LRN local_size 5,
    alpha 0.0005, beta 0.75, k 2; max-pools 3/2 in Caffe's ceil mode."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 11, stride=4)
        self.conv2 = nn.Conv2d(64, 256, 5, padding=2)
        self.conv3 = nn.Conv2d(256, 256, 3, padding=1)
        self.conv4 = nn.Conv2d(256, 256, 3, padding=1)
        self.conv5 = nn.Conv2d(256, 256, 3, padding=1)
        self.fc6 = nn.Linear(256 * 6 * 6, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, 1000)
        self.lrn = CaffeLRN(n=5, alpha=0.0005, beta=0.75, k=2.0)


class RefCNNM(_TwoNormNet):
    """VGG_CNN_M deploy.prototxt (ksimonyan gist f194575702fae63b2829): conv1 96×7×7/2, conv2 256×5×5/2 pad 1,
    conv3-5 512×3×3 pad 1; LRN after relu1 and relu2; 3/2 ceil-mode pools.  ``fc7`` 2048 is CNN-M-2048."""

    def __init__(self, fc7: int = 4096):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 7, stride=2)
        self.conv2 = nn.Conv2d(96, 256, 5, stride=2, padding=1)
        self.conv3 = nn.Conv2d(256, 512, 3, padding=1)
        self.conv4 = nn.Conv2d(512, 512, 3, padding=1)
        self.conv5 = nn.Conv2d(512, 512, 3, padding=1)
        self.fc6 = nn.Linear(512 * 6 * 6, 4096)
        self.fc7 = nn.Linear(4096, fc7)
        self.fc8 = nn.Linear(fc7, 1000)
        self.lrn = CaffeLRN(n=5, alpha=0.0005, beta=0.75, k=2.0)


class RefCNNM2048(RefCNNM):
    def __init__(self):
        super().__init__(fc7=2048)


class RefCNNS(_CaffeStyleNet):
    """VGG_CNN_S deploy.prototxt (ksimonyan gist fd8800eeb36e276cd6f9): pool1 3/3 after LRN, conv2 5×5 unpadded
    with no LRN and a 2/2 pool, pool5 3/3; all ceil mode."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 7, stride=2)
        self.conv2 = nn.Conv2d(96, 256, 5)
        self.conv3 = nn.Conv2d(256, 512, 3, padding=1)
        self.conv4 = nn.Conv2d(512, 512, 3, padding=1)
        self.conv5 = nn.Conv2d(512, 512, 3, padding=1)
        self.fc6 = nn.Linear(512 * 6 * 6, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, 1000)
        self.lrn = CaffeLRN(n=5, alpha=0.0005, beta=0.75, k=2.0)

    def forward(self, x):
        out = {}
        out["norm1"] = self.lrn(F.relu(self.conv1(x)))
        out["pool1"] = F.max_pool2d(out["norm1"], 3, 3, ceil_mode=True)
        out["pool2"] = F.max_pool2d(F.relu(self.conv2(out["pool1"])), 2, 2, ceil_mode=True)
        h = F.relu(self.conv4(F.relu(self.conv3(out["pool2"]))))
        out["pool5"] = F.max_pool2d(F.relu(self.conv5(h)), 3, 3, ceil_mode=True)
        return self._fc_head(out, out["pool5"])


def overfeat_threshold(x: torch.Tensor) -> torch.Tensor:
    """run.lua's nonlinearity, nn.Threshold(0, 1e-6): x where x > 0, else 1e-6 (fastfeat runs a ReLU: the
    fidelity tests measure that departure)."""
    return torch.where(x > 0, x, torch.full_like(x, 1e-6))


class _OverFeatNet(_CaffeStyleNet):
    def _fc_head(self, out: dict, x: torch.Tensor) -> dict:
        out["fc6"] = self.fc6(x.flatten(1))
        out["relu6"] = overfeat_threshold(out["fc6"])
        out["fc7"] = self.fc7(out["relu6"])
        out["relu7"] = overfeat_threshold(out["fc7"])
        out["fc8"] = self.fc8(out["relu7"])
        return out


class RefOverFeatFast(_OverFeatNet):
    """jhjin/overfeat-torch run.lua, network 'small': valid convs with SpatialZeroPadding(1) before conv3-5,
    2×2/2 max-pools, the fully connected layers as 6×6 and 1×1 convolutions (here: Linear on the flatten),
    Threshold(0, 1e-6) after every conv and fc but the last."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5)
        self.conv3 = nn.Conv2d(256, 512, 3, padding=1)
        self.conv4 = nn.Conv2d(512, 1024, 3, padding=1)
        self.conv5 = nn.Conv2d(1024, 1024, 3, padding=1)
        self.fc6 = nn.Linear(1024 * 6 * 6, 3072)
        self.fc7 = nn.Linear(3072, 4096)
        self.fc8 = nn.Linear(4096, 1000)

    def forward(self, x):
        out = {}
        out["pool1"] = F.max_pool2d(overfeat_threshold(self.conv1(x)), 2, 2)
        out["pool2"] = F.max_pool2d(overfeat_threshold(self.conv2(out["pool1"])), 2, 2)
        h = overfeat_threshold(self.conv4(overfeat_threshold(self.conv3(out["pool2"]))))
        out["pool5"] = F.max_pool2d(overfeat_threshold(self.conv5(h)), 2, 2)
        return self._fc_head(out, out["pool5"])


class RefOverFeatAccurate(_OverFeatNet):
    """jhjin/overfeat-torch run.lua, network 'big': conv1 7×7/2, 3×3/3 pool, conv2 7×7, 2×2/2 pool, conv3-6 with
    padding 1, 3×3/3 pool, the fully connected layers as 5×5 and 1×1 convolutions."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 7, stride=2)
        self.conv2 = nn.Conv2d(96, 256, 7)
        self.conv3 = nn.Conv2d(256, 512, 3, padding=1)
        self.conv4 = nn.Conv2d(512, 512, 3, padding=1)
        self.conv5 = nn.Conv2d(512, 1024, 3, padding=1)
        self.conv6 = nn.Conv2d(1024, 1024, 3, padding=1)
        self.fc6 = nn.Linear(1024 * 5 * 5, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, 1000)

    def forward(self, x):
        out = {}
        out["pool1"] = F.max_pool2d(overfeat_threshold(self.conv1(x)), 3, 3)
        out["pool2"] = F.max_pool2d(overfeat_threshold(self.conv2(out["pool1"])), 2, 2)
        h = overfeat_threshold(self.conv5(overfeat_threshold(self.conv4(overfeat_threshold(self.conv3(out["pool2"]))))))
        out["pool6"] = F.max_pool2d(overfeat_threshold(self.conv6(h)), 3, 3)
        return self._fc_head(out, out["pool6"])


REFERENCES: dict[str, type[nn.Module]] = {
    "caffenet": RefCaffeNet,
    "alexnet": RefAlexNet,
    "vgg16": RefVGG16,
    "cnn-f": RefCNNF,
    "cnn-m": RefCNNM,
    "cnn-m-2048": RefCNNM2048,
    "cnn-s": RefCNNS,
    "overfeat-fast": RefOverFeatFast,
    "overfeat-accurate": RefOverFeatAccurate,
}


def reference_model(name: str, state: dict) -> nn.Module:
    try:
        net = REFERENCES[name]()
    except KeyError:
        raise ValueError(f"no reference model for {name!r}; tests/reference.py has {', '.join(REFERENCES)}") from None
    net.load_state_dict(state)
    return net.eval()


# The models preprocessed as torchvision's ImageNet classifiers are (shorter side 256, centre crop 224).
TORCHVISION_STYLE = ("alexnet", "vgg16")
# Shorter side to ``resize`` and a centre crop as well, with their own size, channel order and mean/std:
# the VGG_CNN gist readmes (shorter side 256, 224×224 crop, BGR; the VGG-16 gist's BGR mean pixel stands in
# for the mean image) and jhjin/overfeat-torch run.lua (shorter side = crop = 231 or 221, RGB, one mean
# 118.380948 and std 61.896913 for every channel).
_VGG_CNN = (256, 224, "BGR", (103.939, 116.779, 123.68), (1.0, 1.0, 1.0))
SHORTER_SIDE_STYLE = {
    **{name: _VGG_CNN for name in ("cnn-f", "cnn-m", "cnn-m-2048", "cnn-s")},
    "overfeat-fast": (231, 231, "RGB", (118.380948,) * 3, (61.896913,) * 3),
    "overfeat-accurate": (221, 221, "RGB", (118.380948,) * 3, (61.896913,) * 3),
}


def reference_preprocess(path: str, model: str) -> torch.Tensor:
    """PIL/torch preprocessing, NHWC float32 [1, S, S, 3], independent of DALI."""
    if model != "caffenet" and model not in TORCHVISION_STYLE and model not in SHORTER_SIDE_STYLE:
        raise ValueError(f"no reference preprocessing for {model!r}")
    img = Image.open(path)
    img = img.convert("RGB")
    a = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]  # 1,3,H,W RGB 0..255
    if model == "caffenet":
        a = F.interpolate(a, size=(256, 256), mode="bilinear", align_corners=False, antialias=False)
        crop, mean, std = 227, torch.tensor([104.0, 117.0, 123.0]), torch.ones(3)
        a = a.flip(1)  # RGB -> BGR
    elif model in SHORTER_SIDE_STYLE:
        from torchvision.transforms.v2 import functional as TF

        resize, crop, order, mean, std = SHORTER_SIDE_STYLE[model]
        a = TF.center_crop(TF.resize(a, resize, antialias=True), crop)
        a = a.flip(1) if order == "BGR" else a
        mean, std = torch.tensor(mean), torch.tensor(std)
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
