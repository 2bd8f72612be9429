"""The ``torch`` backend: the forward pass on oneDNN (CPU) or cuDNN/cuBLAS (CUDA).

The network is interpreted from its ModelSpec layer list, so the torch and the
triton backends run exactly the same layers under the same names.

Speed notes (AlexNet batch 64, measured by an earlier session on a 2-core dev box whose CPU it did
not record; benchmarks/results/ holds this project's numbers with their machine):
weights are cast to the compute dtype ONCE here (autocast re-casts fp32 weights on
every call, 21 vs 149 img/s at batch 1), and activations are kept channels_last,
which is what oneDNN's bf16 kernels want (619 -> 1,050 img/s against autocast).
"""

from __future__ import annotations

import functools
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..layers import LRN, Conv, Layer, Linear, MaxPool, ReLU
from ..models import ModelSpec
from .base import Backend, register_backend
from .plan import Op, fused_name


def lrn_band(
    channels: int, size: int, alpha: float, k: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """([C, C, 1, 1] weights, [C] bias) of a 1×1 conv giving k + alpha/size × each channel's window of
    ``size`` squares."""
    idx = torch.arange(channels)
    band = ((idx[:, None] - idx[None, :]).abs() <= size // 2).float() * (alpha / size)
    bias = torch.full((channels,), float(k), dtype=torch.float32, device=device)
    return band[:, :, None, None].to(device).contiguous(memory_format=torch.channels_last), bias


def lrn_fp32(x: torch.Tensor, band: torch.Tensor, bias: torch.Tensor, beta: float) -> torch.Tensor:
    """Caffe LRN across channels, y = x / (k + alpha/n * sum_window x^2)^beta, in fp32, back in x's dtype.

    The windowed sum of squares is a 1×1 convolution with a banded C×C matrix: oneDNN runs it as a
    GEMM, 3.3x faster than torch's local_response_norm (avg_pool3d) at CaffeNet's norm1, batch 64,
    on the 2-core dev box (14 vs 47 ms), and it has no bf16 gap (torch's LRN has no bf16 CPU kernel).
    k rides in as the convolution's ``bias`` (``lrn_band``), and x is only read (it may be a tapped pool output): every
    result is a new tensor or an in-place op on one, six passes over memory where a private copy of x
    and a separate ``add_`` made eight.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    scale = F.conv2d(xf * xf, band, bias)
    if beta == 0.75:  # Caffe's value: s^-0.75 = s^-0.5 * s^-0.25, two cheap roots instead of pow
        scale.rsqrt_()
        out = xf * scale
        scale.sqrt_()
        out.mul_(scale)
    else:
        out = xf * scale.pow_(-beta)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _conv(net: TorchNet, layer: Conv, x: torch.Tensor, inplace_ok: bool) -> torch.Tensor:
    w, b = net.params[layer.name]
    return F.conv2d(x, w, b, stride=layer.stride, padding=layer.pad, groups=layer.groups)


def _conv_relu(net: TorchNet, layer: Conv, x: torch.Tensor) -> torch.Tensor:
    """conv+bias+ReLU as one oneDNN primitive (ReLU as a post-op: no second pass over the output).

    The op Inductor's freezing pass emits for the same pattern; bit-identical to conv then ReLU
    (the post-op applies max(0, ·) to the same accumulator).  The weight is handed over already in
    the blocked layout oneDNN picks for this input shape (``packed_conv_weight``)."""
    _, b = net.params[layer.name]
    pad, stride = [layer.pad] * 2, [layer.stride] * 2
    w = net.packed_conv_weight(layer, tuple(x.shape))
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, pad, stride, [1, 1], layer.groups, "relu", [], "")


def _relu(net: TorchNet, layer: ReLU, x: torch.Tensor, inplace_ok: bool) -> torch.Tensor:
    return F.relu(x, inplace=inplace_ok)


def _pool(net: TorchNet, layer: MaxPool, x: torch.Tensor, inplace_ok: bool) -> torch.Tensor:
    return F.max_pool2d(x, layer.kernel, layer.stride, layer.pad, ceil_mode=layer.ceil)


def _norm(net: TorchNet, layer: LRN, x: torch.Tensor, inplace_ok: bool) -> torch.Tensor:
    return lrn_fp32(x, *net.lrn_bands[layer.name], layer.beta)


def _fc(net: TorchNet, layer: Linear, x: torch.Tensor, inplace_ok: bool) -> torch.Tensor:
    w, b = net.params[layer.name]
    if x.dim() > 2:
        x = x.flatten(1)  # C×H×W order, as Caffe and torchvision flatten
    return F.linear(x, w, b)


# The one place that maps a layer kind to a torch op.
OPS = {Conv: _conv, ReLU: _relu, MaxPool: _pool, LRN: _norm, Linear: _fc}


@register_backend
class TorchNet(Backend):
    """Runs a ModelSpec with torch ops.  ``forward_intermediates`` stops after the deepest tap."""

    name = "torch"
    # Reorder conv weights ahead of time (packed_conv_weight).  Off for subclasses that
    # trace the ops (torch.compile: the reorder ops have no meta kernels, and freezing packs anyway).
    prepacks_weights: ClassVar[bool] = True

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        super().__init__(spec, tensors, device, dtype)
        if device.type == "cuda" and dtype == torch.float32:
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        inputs = spec.input_shapes()
        self.params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lrn_bands: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (band, bias) per LRN layer
        for layer in spec.layers:
            if isinstance(layer, LRN):
                self.lrn_bands[layer.name] = lrn_band(inputs[layer.name][0], layer.size, layer.alpha, layer.k, device)
            if layer.param_key is None:
                continue
            w = tensors[f"{layer.param_key}.weight"].to(device=device, dtype=dtype)
            b = tensors[f"{layer.param_key}.bias"].to(device=device, dtype=dtype)
            if w.dim() == 4:
                w = w.contiguous(memory_format=torch.channels_last)
            self.params[layer.name] = (w, b)
        # Conv weights reordered ahead of time into the layout oneDNN reads, as Inductor's freezing does
        # (without it every call reorders them again); see packed_conv_weight.
        self._packed_conv: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def prepare(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        """NHWC float batch -> NCHW-shaped, channels_last-strided compute tensor on the device."""
        x = images_nhwc.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return x.permute(0, 3, 1, 2)

    def run_layer(self, index: int, x: torch.Tensor, inplace_ok: bool = False) -> torch.Tensor:
        layer: Layer = self.spec.layers[index]
        return OPS[type(layer)](self, layer, x, inplace_ok)

    def packed_conv_weight(self, layer: Conv, input_shape: tuple[int, ...]) -> torch.Tensor:
        """The conv weight in oneDNN's blocked layout for this input shape, made on first use.

        Inductor's freezing does the same; it saves the per-call weight reorder, which matters most at
        small batches (AlexNet batch 1: 51 -> 57 img/s on the Intel Xeon dev box).  Same arithmetic:
        bit-identical output (tested).  A few MB per (layer, input shape)."""
        if not self.prepacks_weights:
            return self.params[layer.name][0]
        key = (layer.name, input_shape)
        packed = self._packed_conv.get(key)
        if packed is None:
            if len(self._packed_conv) > 64:  # many batch sizes (a serve process): keep memory bounded
                self._packed_conv.clear()
            w, _ = self.params[layer.name]
            pad, stride = [layer.pad] * 2, [layer.stride] * 2
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                w, pad, stride, [1, 1], layer.groups, list(input_shape)
            )
            self._packed_conv[key] = packed
        return packed

    @functools.cached_property
    def fuses_conv_relu(self) -> bool:
        """oneDNN's conv+ReLU primitive: CPU only (cuDNN has no such entry point in torch), and in a
        dtype this CPU runs natively (its fp16 path refuses CPUs without AVX512-FP16 or AVX-NE-CONVERT,
        where the plain conv still runs).  Decided once: ``plan`` runs for every batch."""
        if self.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        native = {
            torch.float32: True,
            torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
            torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported(),
        }
        return native.get(self.dtype, False)

    def plan(self, names: list[str]) -> list[Op]:
        """One op per layer up to the deepest requested one; on the CPU a conv whose output is not
        requested runs fused with the ReLU after it."""
        wanted = set(names)
        layers = self.spec.layers[: max(self.spec.index(n) for n in names) + 1]
        ops, i = [], 0
        while i < len(layers):
            layer = layers[i]
            if (
                self.fuses_conv_relu and isinstance(layer, Conv) and layer.name not in wanted
                and i + 1 < len(layers) and isinstance(layers[i + 1], ReLU)
            ):  # fmt: skip
                covers = (layer.name, layers[i + 1].name)
                ops.append(Op(fused_name(covers), layer.kind, covers, partial(_conv_relu, self, layer)))
                i += 2
                continue
            # An in-place ReLU would overwrite a tapped pre-activation (fc7 when fc7 and relu7 are asked).
            inplace = i > 0 and layers[i - 1].name not in wanted
            ops.append(Op(layer.name, layer.kind, (layer.name,), partial(self.run_layer, i, inplace_ok=inplace)))
            i += 1
        return ops
