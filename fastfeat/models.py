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


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network input (see fastfeat.preprocess)."""

    style: str  # "caffe": warp to resize×resize; "torchvision": shorter side to resize
    resize: int
    crop: int
    channel_order: str  # "BGR" or "RGB"
    mean: tuple[float, float, float]  # in 0..255 pixel units, in channel_order
    std: tuple[float, float, float]  # in 0..255 pixel units

    def to_dict(self) -> dict:
        return {
            "style": self.style,
            "resize": self.resize,
            "crop": self.crop,
            "channel_order": self.channel_order,
            "mean": list(self.mean),
            "std": list(self.std),
        }


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

DEFAULT_LAYERS = ("relu6", "relu7")
# DeCAF6 and DeCAF7 (Donahue et al. 2014) are the rectified fc6/fc7 outputs; accepted case-insensitively.
LAYER_ALIASES = {"decaf6": "relu6", "decaf7": "relu7"}


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def parse_layers(spec: ModelSpec, layers: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Validate requested layer names; returns them in forward order, deduplicated.

    The aliases decaf6/decaf7 (any case) name relu6/relu7 of every model that has them."""
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
