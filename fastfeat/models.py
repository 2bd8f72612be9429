"""Model architectures declared as data.

A :class:`ModelSpec` is an ordered list of named :class:`Layer` records.  Everything
else derives from that list: the output shape of every layer, its MAC count, the
state-dict keys and shapes the weights must have, and (in ``fastfeat.backends``)
the forward pass itself.  Every layer is addressable by name, so a user can ask
for ``pool5``, ``relu6`` or ``fc8`` alike.

Layer naming follows Caffe's prototxt, with one deliberate difference: Caffe runs
ReLU *in place*, so Caffe's "fc7" blob already holds the post-ReLU values.  Here
``fc7`` is the pre-activation output of the linear layer and ``relu7`` the
post-ReLU one.  DeCAF's "DeCAF7" feature therefore corresponds to ``relu7``
(and "DeCAF6" to ``relu6``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .layers import LRN, Conv, Layer, Linear, MaxPool, ReLU, Shape

# How much work the decoder may skip (fastfeat.decode explains each and what it costs in fidelity).
# Here, not in fastfeat.decode, so that argument checking does not import DALI or torch.
DECODE_MODES = ("fast", "exact", "dct")
DEFAULT_DECODE = "fast"
# Which library decodes and resizes (--decoder): DALI (fastfeat.decode) or torchvision's decode_jpeg with
# torch's resize (fastfeat.decode_torchvision).  The default is DALI wherever it is installed.
DECODERS = ("dali", "torchvision")


def default_decoder() -> str:
    """dali where the nvidia.dali package is installed, else torchvision (found, not imported: cheap)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        found = False
    return "dali" if found else "torchvision"


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network input (see fastfeat.preprocess)."""

    style: str  # "caffe": warp to resize×resize; "torchvision": shorter side to resize
    resize: int
    crop: int
    channel_order: str  # "BGR" or "RGB"
    mean: tuple[float, float, float]  # in 0..255 pixel units, in channel_order
    std: tuple[float, float, float]  # in 0..255 pixel units
    interpolation: str = "linear"  # the resize's: linear, cubic or nearest (timm/torchvision model configs)

    def to_dict(self) -> dict:
        out = {
            "style": self.style,
            "resize": self.resize,
            "crop": self.crop,
            "channel_order": self.channel_order,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.interpolation != "linear":  # recorded where it is not the default: older metadata stays equal
            out["interpolation"] = self.interpolation
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A network as data.  ``expected_macs`` and ``expected_shapes`` are analytic figures stored with
    the spec (from the paper or the reference implementation); the tests check the derived ones
    against them for every registered model."""

    name: str
    input_size: int
    layers: tuple[Layer, ...]
    preprocess: Preprocess
    description: str = ""
    expected_macs: int | None = None
    expected_shapes: dict[str, Shape] = field(default_factory=dict)

    # -- lookup ---------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(f"unknown layer {name!r} for model {self.name!r}; choose from {', '.join(self.layer_names)}")

    def layer(self, name: str) -> Layer:
        return self.layers[self.index(name)]

    # -- shapes and cost --------------------------------------------------------------------------
    def input_shapes(self) -> dict[str, Shape]:
        """Per-image input shape of every layer."""
        shape: Shape = (3, self.input_size, self.input_size)
        result = {}
        for layer in self.layers:
            result[layer.name] = shape
            shape = layer.out_shape(shape)
        return result

    def shapes(self) -> dict[str, Shape]:
        """Per-image output shape of every layer: (C, H, W) for spatial layers, (F,) for fc."""
        inputs = self.input_shapes()
        return {layer.name: layer.out_shape(inputs[layer.name]) for layer in self.layers}

    def macs(self) -> dict[str, int]:
        """Multiply-accumulates per image of every layer (0 for relu/pool/norm)."""
        inputs = self.input_shapes()
        return {layer.name: layer.macs(inputs[layer.name]) for layer in self.layers}

    def total_macs(self) -> int:
        return sum(self.macs().values())

    # -- weights --------------------------------------------------------------------------------
    def param_shapes(self) -> dict[str, Shape]:
        """State-dict key -> shape, in the naming of the published weights."""
        inputs = self.input_shapes()
        result: dict[str, Shape] = {}
        for layer in self.layers:
            result.update(layer.param_shapes(inputs[layer.name]))
        return result

    def feature_info(self) -> list[dict]:
        """timm-style description of every tap: name, kind, per-image shape, MACs."""
        shapes, macs = self.shapes(), self.macs()
        return [
            {"name": layer.name, "kind": layer.kind, "shape": list(shapes[layer.name]), "macs": macs[layer.name]}
            for layer in self.layers
        ]


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a spec to the registry that ``--model``, the CLI help and the tests read."""
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} is registered twice")
    MODELS[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return list(MODELS)


# ----------------------------------------------------------------------------------------------
# The architectures
# ----------------------------------------------------------------------------------------------
# Caffe's LRN: b = a / (k + alpha/n * sum_n a^2)^beta, ACROSS_CHANNELS, n = 5.
CAFFE_LRN = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0}

CAFFENET = register_model(
    ModelSpec(
        name="caffenet",
        input_size=227,
        description="BVLC reference CaffeNet (DeCAF's network): conv→relu→pool→norm order, grouped conv2/4/5",
        layers=(
            Conv("conv1", key="conv1", out=96, kernel=11, stride=4),
            ReLU("relu1"),
            MaxPool("pool1", kernel=3, stride=2, ceil=True),
            LRN("norm1", **CAFFE_LRN),
            Conv("conv2", key="conv2", out=256, kernel=5, pad=2, groups=2),
            ReLU("relu2"),
            MaxPool("pool2", kernel=3, stride=2, ceil=True),
            LRN("norm2", **CAFFE_LRN),
            Conv("conv3", key="conv3", out=384, kernel=3, pad=1),
            ReLU("relu3"),
            Conv("conv4", key="conv4", out=384, kernel=3, pad=1, groups=2),
            ReLU("relu4"),
            Conv("conv5", key="conv5", out=256, kernel=3, pad=1, groups=2),
            ReLU("relu5"),
            MaxPool("pool5", kernel=3, stride=2, ceil=True),
            Linear("fc6", key="fc6", out=4096),
            ReLU("relu6"),
            Linear("fc7", key="fc7", out=4096),
            ReLU("relu7"),
            Linear("fc8", key="fc8", out=1000),
        ),
        preprocess=Preprocess(
            style="caffe", resize=256, crop=227, channel_order="BGR", mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0)
        ),
        expected_macs=724_406_816,
        expected_shapes={"conv1": (96, 55, 55), "pool1": (96, 27, 27), "norm2": (256, 13, 13), "pool5": (256, 6, 6)},
    )
)

TORCHVISION_PREPROCESS = Preprocess(
    style="torchvision",
    resize=256,
    crop=224,
    channel_order="RGB",
    mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
    std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
)

ALEXNET = register_model(
    ModelSpec(
        name="alexnet",
        input_size=224,
        description="torchvision AlexNet (64-192-384-256-256); loads alexnet-owt-7be5be79.pth unchanged",
        layers=(
            Conv("conv1", key="features.0", out=64, kernel=11, stride=4, pad=2),
            ReLU("relu1"),
            MaxPool("pool1", kernel=3, stride=2),
            Conv("conv2", key="features.3", out=192, kernel=5, pad=2),
            ReLU("relu2"),
            MaxPool("pool2", kernel=3, stride=2),
            Conv("conv3", key="features.6", out=384, kernel=3, pad=1),
            ReLU("relu3"),
            Conv("conv4", key="features.8", out=256, kernel=3, pad=1),
            ReLU("relu4"),
            Conv("conv5", key="features.10", out=256, kernel=3, pad=1),
            ReLU("relu5"),
            MaxPool("pool5", kernel=3, stride=2),
            # torchvision's AdaptiveAvgPool2d((6, 6)) is the identity on a 6×6 map (224 input).
            Linear("fc6", key="classifier.1", out=4096),
            ReLU("relu6"),
            Linear("fc7", key="classifier.4", out=4096),
            ReLU("relu7"),
            Linear("fc8", key="classifier.6", out=1000),
        ),
        preprocess=TORCHVISION_PREPROCESS,
        expected_macs=714_188_480,
        expected_shapes={"conv1": (64, 55, 55), "pool2": (192, 13, 13), "pool5": (256, 6, 6)},
    )
)


VGG16 = register_model(
    ModelSpec(
        name="vgg16",
        input_size=224,
        description="torchvision VGG-16 (configuration D, no batch norm); loads vgg16-397923af.pth unchanged",
        layers=(
            Conv("conv1_1", key="features.0", out=64, kernel=3, pad=1),
            ReLU("relu1_1"),
            Conv("conv1_2", key="features.2", out=64, kernel=3, pad=1),
            ReLU("relu1_2"),
            MaxPool("pool1", kernel=2, stride=2),  # features.4
            Conv("conv2_1", key="features.5", out=128, kernel=3, pad=1),
            ReLU("relu2_1"),
            Conv("conv2_2", key="features.7", out=128, kernel=3, pad=1),
            ReLU("relu2_2"),
            MaxPool("pool2", kernel=2, stride=2),  # features.9
            Conv("conv3_1", key="features.10", out=256, kernel=3, pad=1),
            ReLU("relu3_1"),
            Conv("conv3_2", key="features.12", out=256, kernel=3, pad=1),
            ReLU("relu3_2"),
            Conv("conv3_3", key="features.14", out=256, kernel=3, pad=1),
            ReLU("relu3_3"),
            MaxPool("pool3", kernel=2, stride=2),  # features.16
            Conv("conv4_1", key="features.17", out=512, kernel=3, pad=1),
            ReLU("relu4_1"),
            Conv("conv4_2", key="features.19", out=512, kernel=3, pad=1),
            ReLU("relu4_2"),
            Conv("conv4_3", key="features.21", out=512, kernel=3, pad=1),
            ReLU("relu4_3"),
            MaxPool("pool4", kernel=2, stride=2),  # features.23
            Conv("conv5_1", key="features.24", out=512, kernel=3, pad=1),
            ReLU("relu5_1"),
            Conv("conv5_2", key="features.26", out=512, kernel=3, pad=1),
            ReLU("relu5_2"),
            Conv("conv5_3", key="features.28", out=512, kernel=3, pad=1),
            ReLU("relu5_3"),
            MaxPool("pool5", kernel=2, stride=2),  # features.30
            # torchvision's AdaptiveAvgPool2d((7, 7)) is the identity on a 7×7 map (224 input);
            # its Dropouts (classifier.2, .5) are no-ops at inference.
            Linear("fc6", key="classifier.0", out=4096),
            ReLU("relu6"),
            Linear("fc7", key="classifier.3", out=4096),
            ReLU("relu7"),
            Linear("fc8", key="classifier.6", out=1000),
        ),
        preprocess=TORCHVISION_PREPROCESS,
        # Hand formula, per image: sum over convs of OH·OW·Cout·3·3·Cin (224² ×2, 112² ×2, 56² ×3,
        # 28² ×3, 14² ×3) = 15,346,630,656, plus fc 25088·4096 + 4096·4096 + 4096·1000 = 123,633,664.
        # Cross-checked against torch.utils.flop_counter.FlopCounterMode on torchvision's vgg16 at
        # 1×3×224×224: 30,940,528,640 FLOPs = 2 × this (torchvision's "15.47 GFLOPS" is this count).
        expected_macs=15_470_264_320,
        expected_shapes={
            "conv1_1": (64, 224, 224),
            "pool1": (64, 112, 112),
            "conv3_3": (256, 56, 56),
            "pool4": (512, 14, 14),
            "pool5": (512, 7, 7),
            "fc6": (4096,),
            "fc8": (1000,),
        },
    )
)

# ----------------------------------------------------------------------------------------------
# Chatfield et al. 2014, "Return of the Devil in the Details" (BMVC): CNN-F, CNN-M, CNN-M-2048, CNN-S.
# Layer order, strides, pads, LRN and pooling from the released BVLC deploy prototxts (ksimonyan gists
# a32c9063ec8e1118221a VGG_CNN_F, f194575702fae63b2829 VGG_CNN_M, fd8800eeb36e276cd6f9 VGG_CNN_S; read here
# as copied in weihancug/SSGF-for-HRRS-scene-classification model_protext/VGG_{F,M,S}/*.prototxt):
# conv → ReLU → LRN → pool (LRN before the pool, unlike CaffeNet), Caffe pooling (ceil mode), input
# 224×224.  The same nets in MatConvNet (vlfeat/matconvnet utils/import-ref-models.sh: imagenet-vgg-f/m/s/
# m-2048.mat, converted from the deep_eval release by utils/import-caffe.py, which writes LRN as
# [local_size, k, alpha/local_size, beta] and pads Caffe's ceil-mode pools on the bottom/right).
# Preprocessing (gist readme): shorter side rescaled to 256, the centre 224×224 crop, BGR, minus the released
# mean BGR image VGG_mean.binaryproto (pass it as --mean-file).  That image's per-channel values are not
# published in any source read here: without --mean-file the default is the ILSVRC-2012 mean pixel the same
# authors publish for VGG-16 (ksimonyan gist 211839e770f7b538e2d8: BGR 103.939, 116.779, 123.68).
VGG_CNN_LRN = {"size": 5, "alpha": 5e-4, "beta": 0.75, "k": 2.0}  # local_size 5, alpha 0.0005, beta 0.75, k 2
VGG_CNN_PREPROCESS = Preprocess(
    style="torchvision", resize=256, crop=224, channel_order="BGR", mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0)
)


def _vgg_cnn_head(fc7: int) -> tuple[Layer, ...]:
    return (
        Linear("fc6", key="fc6", out=4096),
        ReLU("relu6"),
        Linear("fc7", key="fc7", out=fc7),
        ReLU("relu7"),
        Linear("fc8", key="fc8", out=1000),
    )


CNN_F = register_model(
    ModelSpec(
        name="cnn-f",
        input_size=224,
        description="Chatfield et al. 2014 CNN-F (VGG_CNN_F / imagenet-vgg-f.mat): 64-256-256-256-256, conv1 11×11/4",
        layers=(
            Conv("conv1", key="conv1", out=64, kernel=11, stride=4),
            ReLU("relu1"),
            LRN("norm1", **VGG_CNN_LRN),
            MaxPool("pool1", kernel=3, stride=2, ceil=True),
            Conv("conv2", key="conv2", out=256, kernel=5, pad=2),
            ReLU("relu2"),
            LRN("norm2", **VGG_CNN_LRN),
            MaxPool("pool2", kernel=3, stride=2, ceil=True),
            Conv("conv3", key="conv3", out=256, kernel=3, pad=1),
            ReLU("relu3"),
            Conv("conv4", key="conv4", out=256, kernel=3, pad=1),
            ReLU("relu4"),
            Conv("conv5", key="conv5", out=256, kernel=3, pad=1),
            ReLU("relu5"),
            MaxPool("pool5", kernel=3, stride=2, ceil=True),
            *_vgg_cnn_head(4096),
        ),
        preprocess=VGG_CNN_PREPROCESS,
        # Hand formula, per image, OH·OW·Cout·K²·Cin: conv1 54²·64·121·3 = 67,744,512; conv2 27²·256·25·64
        # = 298,598,400; conv3-5 3 × 13²·256·9·256 = 299,040,768; fc 9216·4096 + 4096² + 4096·1000 = 58,621,952.
        expected_macs=724_005_632,
        expected_shapes={"conv1": (64, 54, 54), "pool1": (64, 27, 27), "pool2": (256, 13, 13), "pool5": (256, 6, 6)},
    )
)


def _cnn_m_layers(fc7: int) -> tuple[Layer, ...]:
    return (
        Conv("conv1", key="conv1", out=96, kernel=7, stride=2),
        ReLU("relu1"),
        LRN("norm1", **VGG_CNN_LRN),
        MaxPool("pool1", kernel=3, stride=2, ceil=True),
        Conv("conv2", key="conv2", out=256, kernel=5, stride=2, pad=1),
        ReLU("relu2"),
        LRN("norm2", **VGG_CNN_LRN),
        MaxPool("pool2", kernel=3, stride=2, ceil=True),
        Conv("conv3", key="conv3", out=512, kernel=3, pad=1),
        ReLU("relu3"),
        Conv("conv4", key="conv4", out=512, kernel=3, pad=1),
        ReLU("relu4"),
        Conv("conv5", key="conv5", out=512, kernel=3, pad=1),
        ReLU("relu5"),
        MaxPool("pool5", kernel=3, stride=2, ceil=True),
        *_vgg_cnn_head(fc7),
    )


# Hand formula: conv1 109²·96·49·3 = 167,664,672; conv2 26²·256·25·96 = 415,334,400; conv3 13²·512·9·256
# = 199,360,512; conv4, conv5 2 × 13²·512·9·512 = 797,442,048; fc6 18432·4096 = 75,497,472.
_CNN_M_CONV_MACS = 167_664_672 + 415_334_400 + 199_360_512 + 797_442_048
_CNN_M_SHAPES = {"conv1": (96, 109, 109), "pool1": (96, 54, 54), "conv2": (256, 26, 26), "pool5": (512, 6, 6)}

CNN_M = register_model(
    ModelSpec(
        name="cnn-m",
        input_size=224,
        description="Chatfield et al. 2014 CNN-M (VGG_CNN_M / imagenet-vgg-m.mat): 96-256-512-512-512, conv1 7×7/2",
        layers=_cnn_m_layers(4096),
        preprocess=VGG_CNN_PREPROCESS,
        expected_macs=_CNN_M_CONV_MACS + 18432 * 4096 + 4096 * 4096 + 4096 * 1000,  # 1,676,172,320
        expected_shapes=_CNN_M_SHAPES,
    )
)

# CNN-M with a 2048-d fc7 (the paper's section 4.4 low-dimensional variants; vlfeat/matconvnet
# import-ref-models.sh CNN_M_2048 -> imagenet-vgg-m-2048.mat; BVLC gist VGG_CNN_M_2048).
CNN_M_2048 = register_model(
    ModelSpec(
        name="cnn-m-2048",
        input_size=224,
        description="Chatfield et al. 2014 CNN-M 2048 (imagenet-vgg-m-2048.mat): CNN-M with a 2048-d fc7",
        layers=_cnn_m_layers(2048),
        preprocess=VGG_CNN_PREPROCESS,
        expected_macs=_CNN_M_CONV_MACS + 18432 * 4096 + 4096 * 2048 + 2048 * 1000,  # 1,665,735,712
        expected_shapes={**_CNN_M_SHAPES, "fc7": (2048,)},
    )
)

CNN_S = register_model(
    ModelSpec(
        name="cnn-s",
        input_size=224,
        description="Chatfield et al. 2014 CNN-S (VGG_CNN_S / imagenet-vgg-s.mat): 96-256-512-512-512, ×3 pools",
        layers=(
            Conv("conv1", key="conv1", out=96, kernel=7, stride=2),
            ReLU("relu1"),
            LRN("norm1", **VGG_CNN_LRN),
            MaxPool("pool1", kernel=3, stride=3, ceil=True),
            Conv("conv2", key="conv2", out=256, kernel=5),  # no pad, stride 1, and no LRN after it
            ReLU("relu2"),
            MaxPool("pool2", kernel=2, stride=2, ceil=True),
            Conv("conv3", key="conv3", out=512, kernel=3, pad=1),
            ReLU("relu3"),
            Conv("conv4", key="conv4", out=512, kernel=3, pad=1),
            ReLU("relu4"),
            Conv("conv5", key="conv5", out=512, kernel=3, pad=1),
            ReLU("relu5"),
            MaxPool("pool5", kernel=3, stride=3, ceil=True),
            *_vgg_cnn_head(4096),
        ),
        preprocess=VGG_CNN_PREPROCESS,
        # Hand formula: conv1 109²·96·49·3 = 167,664,672; conv2 33²·256·25·96 = 669,081,600; conv3
        # 17²·512·9·256 = 340,918,272; conv4, conv5 2 × 17²·512·9·512 = 1,363,673,088; fc 58,621,952 + 16,875,520.
        expected_macs=2_637_708_320,
        expected_shapes={"pool1": (96, 37, 37), "conv2": (256, 33, 33), "pool2": (256, 17, 17), "pool5": (512, 6, 6)},
    )
)

# ----------------------------------------------------------------------------------------------
# OverFeat (Sermanet et al. 2014), the networks of the released binary (sermanet/OverFeat README.md:
# "small" = fast, net_weight_0, 231×231 windows; "large" = accurate, net_weight_1, 221×221).  The layer
# table, the weights file layout and the preprocessing are those of jhjin/overfeat-torch run.lua, a Torch7
# port that reads the released files: valid convolutions (pads as SpatialZeroPadding(1,1,1,1) before
# conv3+), Torch7 max-pools (floor mode; every pooled size here divides exactly), the fully connected
# layers as convolutions over the whole 6×6 / 5×5 map (= a linear layer on the C×H×W flatten).
# Departures, both documented in docs/networks.md: run.lua's nonlinearity is nn.Threshold(0, 1e-6) (1e-6,
# not 0, below zero); here it is a ReLU (tests/reference.py keeps the threshold: 3e-6 relative difference
# through fc8, measured with random weights on real photos).  run.lua's input is RGB in 0..255, shorter side
# scaled to 231 (221), centre crop, then floor()ed, then (x - 118.380948) / 61.896913 on every channel; here
# the crop is torchvision's (offset rounded, not floored) and the pixels are not floored.
# Layer names: conv1…, then fc6, fc7, fc8 for the fully connected layers of both nets (so relu6/relu7 and
# the DeCAF aliases mean "first/second fully connected" here too); accurate's sixth conv is conv6 and its
# ReLU relu_conv6 (relu6 is the fully connected one), its last pool pool6.
OVERFEAT_MEAN, OVERFEAT_STD = 118.380948, 61.896913


def _overfeat_preprocess(size: int) -> Preprocess:
    return Preprocess(
        style="torchvision", resize=size, crop=size, channel_order="RGB",
        mean=(OVERFEAT_MEAN,) * 3, std=(OVERFEAT_STD,) * 3,
    )  # fmt: skip


OVERFEAT_FAST = register_model(
    ModelSpec(
        name="overfeat-fast",
        input_size=231,
        description="OverFeat fast (small) network, net_weight_0: 96-256-512-1024-1024, fc 3072-4096-1000",
        layers=(
            Conv("conv1", key="conv1", out=96, kernel=11, stride=4),
            ReLU("relu1"),
            MaxPool("pool1", kernel=2, stride=2),
            Conv("conv2", key="conv2", out=256, kernel=5),
            ReLU("relu2"),
            MaxPool("pool2", kernel=2, stride=2),
            Conv("conv3", key="conv3", out=512, kernel=3, pad=1),
            ReLU("relu3"),
            Conv("conv4", key="conv4", out=1024, kernel=3, pad=1),
            ReLU("relu4"),
            Conv("conv5", key="conv5", out=1024, kernel=3, pad=1),
            ReLU("relu5"),
            MaxPool("pool5", kernel=2, stride=2),
            Linear("fc6", key="fc6", out=3072),
            ReLU("relu6"),
            Linear("fc7", key="fc7", out=4096),
            ReLU("relu7"),
            Linear("fc8", key="fc8", out=1000),
        ),
        preprocess=_overfeat_preprocess(231),
        # Hand formula: conv1 56²·96·121·3 = 109,283,328; conv2 24²·256·25·96 = 353,894,400; conv3 12²·512·9·256
        # = 169,869,312; conv4 12²·1024·9·512 = 679,477,248; conv5 12²·1024·9·1024 = 1,358,954,496; fc 36864·3072
        # + 3072·4096 + 4096·1000 = 129,925,120.
        expected_macs=2_801_403_904,
        expected_shapes={"conv1": (96, 56, 56), "pool2": (256, 12, 12), "pool5": (1024, 6, 6), "fc6": (3072,)},
    )
)

OVERFEAT_ACCURATE = register_model(
    ModelSpec(
        name="overfeat-accurate",
        input_size=221,
        description="OverFeat accurate (large) network, net_weight_1: 96-256-512-512-1024-1024, fc 4096-4096-1000",
        layers=(
            Conv("conv1", key="conv1", out=96, kernel=7, stride=2),
            ReLU("relu1"),
            MaxPool("pool1", kernel=3, stride=3),
            Conv("conv2", key="conv2", out=256, kernel=7),
            ReLU("relu2"),
            MaxPool("pool2", kernel=2, stride=2),
            Conv("conv3", key="conv3", out=512, kernel=3, pad=1),
            ReLU("relu3"),
            Conv("conv4", key="conv4", out=512, kernel=3, pad=1),
            ReLU("relu4"),
            Conv("conv5", key="conv5", out=1024, kernel=3, pad=1),
            ReLU("relu5"),
            Conv("conv6", key="conv6", out=1024, kernel=3, pad=1),
            ReLU("relu_conv6"),
            MaxPool("pool6", kernel=3, stride=3),
            Linear("fc6", key="fc6", out=4096),
            ReLU("relu6"),
            Linear("fc7", key="fc7", out=4096),
            ReLU("relu7"),
            Linear("fc8", key="fc8", out=1000),
        ),
        preprocess=_overfeat_preprocess(221),
        # Hand formula: conv1 108²·96·49·3 = 164,602,368; conv2 30²·256·49·96 = 1,083,801,600; conv3
        # 15²·512·9·256 = 265,420,800; conv4 15²·512·9·512 = 530,841,600; conv5 15²·1024·9·512 = 1,061,683,200;
        # conv6 15²·1024·9·1024 = 2,123,366,400; fc 25600·4096 + 4096² + 4096·1000 = 125,730,816.
        expected_macs=5_355_446_784,
        expected_shapes={"conv1": (96, 108, 108), "pool1": (96, 36, 36), "pool2": (256, 15, 15), "pool6": (1024, 5, 5)},
    )
)

DEFAULT_LAYERS = ("relu6", "relu7")
# DeCAF6 and DeCAF7 (Donahue et al. 2014) are the rectified fc6/fc7 outputs; accepted case-insensitively.
LAYER_ALIASES = {"decaf6": "relu6", "decaf7": "relu7"}


def get_model(name: str) -> ModelSpec:
    """A built-in spec (fastfeat.model_lookup.resolve_model also takes torchvision:NAME / timm:NAME)."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; choose from {', '.join(MODELS)}, torchvision:NAME or timm:NAME"
        ) from None


def parse_layers(spec: ModelSpec, layers: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Validate requested layer names; returns them in forward order, deduplicated.

    The aliases decaf6/decaf7 (any case) name relu6/relu7 of every model that has them."""
    if getattr(spec, "is_zoo", False):  # a torchvision/timm model's own tap names (fastfeat.zoo)
        return spec.parse_layers(layers)
    if layers is None:
        names = list(DEFAULT_LAYERS)
    elif isinstance(layers, str):
        names = [n.strip() for n in layers.split(",") if n.strip()]
    else:
        names = list(layers)
    if not names:
        raise ConfigError("no layers requested")
    known = set(spec.layer_names)
    canonical = []
    for n in names:
        name = LAYER_ALIASES.get(n.lower(), n) if isinstance(n, str) else n
        if name not in known:
            raise ConfigError(f"unknown layer {n!r} for model {spec.name!r}; choose from {', '.join(spec.layer_names)}")
        canonical.append(name)
    return sorted(set(canonical), key=spec.index)
