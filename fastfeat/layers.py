"""Layer kinds as types: each carries its hyper-parameters and computes its own output shape,
MAC count and parameter shapes.

A model spec (fastfeat.models) is a tuple of these.  Nothing outside the backends' op tables
(one dict per backend that maps a kind to an op) asks which kind a layer is, so a network that
needs a new kind adds one class here and one entry per backend table.

Shapes are per image: (C, H, W) for spatial layers, (F,) for flat ones.  The spatial size
arithmetic is the kernels' own (fastfeat.kernels.sizes), so the specs and the Triton launchers
cannot disagree about an output size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

from fastfeat.kernels.sizes import conv_output_size, pool_output_size

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Layer:
    """One named layer.  ``param_key`` is the state-dict prefix of a layer with weights
    (``"conv1"`` for CaffeNet, ``"features.0"`` for torchvision's AlexNet), None otherwise."""

    kind: ClassVar[str]
    name: str

    def out_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def macs(self, in_shape: Shape) -> int:
        """Multiply-accumulates per image."""
        return 0

    def param_shapes(self, in_shape: Shape) -> dict[str, Shape]:
        """State-dict key -> shape of this layer's weights."""
        return {}

    @property
    def param_key(self) -> str | None:
        return None

    @property
    def params(self) -> dict:
        """The hyper-parameters as a plain dict (metadata, messages)."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "key")}


@dataclass(frozen=True)
class Conv(Layer):
    kind: ClassVar[str] = "conv"
    out: int = 0
    kernel: int = 1
    stride: int = 1
    pad: int = 0
    groups: int = 1
    key: str = ""

    def out_shape(self, in_shape: Shape) -> Shape:
        c, h, w = in_shape
        if c % self.groups or self.out % self.groups:
            raise ValueError(
                f"{self.name}: {c} input / {self.out} output channels do not split into {self.groups} groups"
            )
        size = lambda n: conv_output_size(n, self.kernel, self.stride, self.pad)
        return (self.out, size(h), size(w))

    def macs(self, in_shape: Shape) -> int:
        cout, oh, ow = self.out_shape(in_shape)
        return oh * ow * cout * self.kernel * self.kernel * (in_shape[0] // self.groups)

    def param_shapes(self, in_shape: Shape) -> dict[str, Shape]:
        weight = (self.out, in_shape[0] // self.groups, self.kernel, self.kernel)
        return {f"{self.key}.weight": weight, f"{self.key}.bias": (self.out,)}

    @property
    def param_key(self) -> str:
        return self.key


@dataclass(frozen=True)
class ReLU(Layer):
    kind: ClassVar[str] = "relu"


@dataclass(frozen=True)
class MaxPool(Layer):
    """Max-pool; ``ceil`` is Caffe's rounding (CaffeNet), floor is torchvision's."""

    kind: ClassVar[str] = "pool"
    kernel: int = 3
    stride: int = 2
    pad: int = 0
    ceil: bool = False

    def out_shape(self, in_shape: Shape) -> Shape:
        c, h, w = in_shape
        size = lambda n: pool_output_size(n, self.kernel, self.stride, self.pad, self.ceil)
        return (c, size(h), size(w))


@dataclass(frozen=True)
class LRN(Layer):
    """Caffe's LRN across channels: b = a / (k + alpha/size * sum_window a^2)^beta."""

    kind: ClassVar[str] = "norm"
    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0


@dataclass(frozen=True)
class Linear(Layer):
    """Fully connected; a spatial input is flattened in C×H×W order, as Caffe and torchvision do."""

    kind: ClassVar[str] = "fc"
    out: int = 0
    key: str = ""

    def out_shape(self, in_shape: Shape) -> Shape:
        return (self.out,)

    def macs(self, in_shape: Shape) -> int:
        return math.prod(in_shape) * self.out

    def param_shapes(self, in_shape: Shape) -> dict[str, Shape]:
        return {f"{self.key}.weight": (self.out, math.prod(in_shape)), f"{self.key}.bias": (self.out,)}

    @property
    def param_key(self) -> str:
        return self.key


LAYER_KINDS: dict[str, type[Layer]] = {cls.kind: cls for cls in (Conv, ReLU, MaxPool, LRN, Linear)}
