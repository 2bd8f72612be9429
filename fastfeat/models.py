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

import math
from dataclasses import dataclass, field

LAYER_KINDS = ("conv", "relu", "pool", "norm", "fc")


@dataclass(frozen=True)
class Layer:
    """One named layer.

    ``params`` holds the hyper-parameters of the kind:
    conv: out, kernel, stride, pad, groups; pool: kernel, stride, ceil;
    norm: size, alpha, beta, k (Caffe semantics, alpha divided by size); fc: out.
    ``param_key`` is the state-dict prefix of a layer that has weights
    (``"conv1"`` for CaffeNet, ``"features.0"`` for torchvision's AlexNet).
    """

    name: str
    kind: str
    params: dict = field(default_factory=dict)
    param_key: str | None = None


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
    name: str
    input_size: int
    layers: tuple[Layer, ...]
    preprocess: Preprocess
    description: str = ""

    # -- lookup ---------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(f"unknown layer {name!r} for model {self.name!r}; choose from {', '.join(self.layer_names)}")

    # -- shapes and cost --------------------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image output shape of every layer: (C, H, W) for spatial layers, (F,) for fc."""
        c, h, w = 3, self.input_size, self.input_size
        out: dict[str, tuple[int, ...]] = {}
        flat = None
        for layer in self.layers:
            p = layer.params
            if layer.kind == "conv":
                h = (h + 2 * p["pad"] - p["kernel"]) // p["stride"] + 1
                w = (w + 2 * p["pad"] - p["kernel"]) // p["stride"] + 1
                c = p["out"]
            elif layer.kind == "pool":
                h = pool_out_size(h, p["kernel"], p["stride"], p["ceil"])
                w = pool_out_size(w, p["kernel"], p["stride"], p["ceil"])
            elif layer.kind == "fc":
                flat = p["out"]
            out[layer.name] = (flat,) if flat is not None else (c, h, w)
        return out

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image input shape of every layer."""
        shapes = self.shapes()
        prev: tuple[int, ...] = (3, self.input_size, self.input_size)
        result = {}
        for layer in self.layers:
            result[layer.name] = prev
            prev = shapes[layer.name]
        return result

    def macs(self) -> dict[str, int]:
        """Multiply-accumulates per image of every layer (0 for relu/pool/norm)."""
        shapes, inputs = self.shapes(), self.input_shapes()
        result = {}
        for layer in self.layers:
            p = layer.params
            if layer.kind == "conv":
                cin = inputs[layer.name][0]
                cout, oh, ow = shapes[layer.name]
                result[layer.name] = oh * ow * cout * p["kernel"] * p["kernel"] * (cin // p["groups"])
            elif layer.kind == "fc":
                result[layer.name] = math.prod(inputs[layer.name]) * p["out"]
            else:
                result[layer.name] = 0
        return result

    def total_macs(self) -> int:
        return sum(self.macs().values())

    # -- weights --------------------------------------------------------------------------------
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """State-dict key -> shape, in the naming of the published weights."""
        inputs = self.input_shapes()
        result: dict[str, tuple[int, ...]] = {}
        for layer in self.layers:
            p = layer.params
            if layer.kind == "conv":
                cin = inputs[layer.name][0]
                result[f"{layer.param_key}.weight"] = (p["out"], cin // p["groups"], p["kernel"], p["kernel"])
                result[f"{layer.param_key}.bias"] = (p["out"],)
            elif layer.kind == "fc":
                result[f"{layer.param_key}.weight"] = (p["out"], math.prod(inputs[layer.name]))
                result[f"{layer.param_key}.bias"] = (p["out"],)
        return result

    def feature_info(self) -> list[dict]:
        """timm-style description of every tap: name, kind, per-image shape, MACs."""
        shapes, macs = self.shapes(), self.macs()
        return [
            {"name": layer.name, "kind": layer.kind, "shape": list(shapes[layer.name]), "macs": macs[layer.name]}
            for layer in self.layers
        ]


def pool_out_size(size: int, kernel: int, stride: int, ceil: bool) -> int:
    if ceil:
        out = -(-(size - kernel) // stride) + 1
        # Caffe/torch rule: the last window must start inside the input.
        if (out - 1) * stride >= size:
            out -= 1
        return out
    return (size - kernel) // stride + 1


# ----------------------------------------------------------------------------------------------
# The two architectures
# ----------------------------------------------------------------------------------------------
def _conv(name, key, out, kernel, stride=1, pad=0, groups=1):
    return Layer(name, "conv", {"out": out, "kernel": kernel, "stride": stride, "pad": pad, "groups": groups}, key)


def _pool(name, ceil):
    return Layer(name, "pool", {"kernel": 3, "stride": 2, "ceil": ceil})


def _norm(name):
    # Caffe's LRN: b = a / (k + alpha/n * sum_n a^2)^beta, ACROSS_CHANNELS.
    return Layer(name, "norm", {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0})


def _fc(name, key, out):
    return Layer(name, "fc", {"out": out}, key)


def _relu(name):
    return Layer(name, "relu")


CAFFENET = ModelSpec(
    name="caffenet",
    input_size=227,
    description="BVLC reference CaffeNet (DeCAF's network): conv→relu→pool→norm order, grouped conv2/4/5",
    layers=(
        _conv("conv1", "conv1", 96, 11, stride=4),
        _relu("relu1"),
        _pool("pool1", ceil=True),
        _norm("norm1"),
        _conv("conv2", "conv2", 256, 5, pad=2, groups=2),
        _relu("relu2"),
        _pool("pool2", ceil=True),
        _norm("norm2"),
        _conv("conv3", "conv3", 384, 3, pad=1),
        _relu("relu3"),
        _conv("conv4", "conv4", 384, 3, pad=1, groups=2),
        _relu("relu4"),
        _conv("conv5", "conv5", 256, 3, pad=1, groups=2),
        _relu("relu5"),
        _pool("pool5", ceil=True),
        _fc("fc6", "fc6", 4096),
        _relu("relu6"),
        _fc("fc7", "fc7", 4096),
        _relu("relu7"),
        _fc("fc8", "fc8", 1000),
    ),
    preprocess=Preprocess(
        style="caffe", resize=256, crop=227, channel_order="BGR", mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0)
    ),
)

ALEXNET = ModelSpec(
    name="alexnet",
    input_size=224,
    description="torchvision AlexNet (64-192-384-256-256); loads alexnet-owt-7be5be79.pth unchanged",
    layers=(
        _conv("conv1", "features.0", 64, 11, stride=4, pad=2),
        _relu("relu1"),
        _pool("pool1", ceil=False),
        _conv("conv2", "features.3", 192, 5, pad=2),
        _relu("relu2"),
        _pool("pool2", ceil=False),
        _conv("conv3", "features.6", 384, 3, pad=1),
        _relu("relu3"),
        _conv("conv4", "features.8", 256, 3, pad=1),
        _relu("relu4"),
        _conv("conv5", "features.10", 256, 3, pad=1),
        _relu("relu5"),
        _pool("pool5", ceil=False),
        # torchvision's AdaptiveAvgPool2d((6, 6)) is the identity on a 6×6 map (224 input).
        _fc("fc6", "classifier.1", 4096),
        _relu("relu6"),
        _fc("fc7", "classifier.4", 4096),
        _relu("relu7"),
        _fc("fc8", "classifier.6", 1000),
    ),
    preprocess=Preprocess(
        style="torchvision",
        resize=256,
        crop=224,
        channel_order="RGB",
        mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
        std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
    ),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (CAFFENET, ALEXNET)}

DEFAULT_LAYERS = ("relu6", "relu7")


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def parse_layers(spec: ModelSpec, layers: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Validate requested layer names; returns them in forward order, deduplicated."""
    if layers is None:
        names = list(DEFAULT_LAYERS)
    elif isinstance(layers, str):
        names = [n.strip() for n in layers.split(",") if n.strip()]
    else:
        names = list(layers)
    if not names:
        raise ValueError("no layers requested")
    known = set(spec.layer_names)
    for n in names:
        if n not in known:
            raise ValueError(f"unknown layer {n!r} for model {spec.name!r}; choose from {', '.join(spec.layer_names)}")
    return sorted(set(names), key=spec.index)
