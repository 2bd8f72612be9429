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

from functools import partial

import torch
import torch.nn.functional as F

from ..layers import LRN, Conv, Layer, Linear, MaxPool, ReLU
from ..models import ModelSpec
from .base import Backend, register_backend
from .plan import Op


def lrn_band(channels: int, size: int, alpha: float, device: torch.device) -> torch.Tensor:
    """[C, C, 1, 1] weights of a 1×1 conv that sums each channel's window of ``size`` squares × alpha/size."""
    idx = torch.arange(channels)
    band = ((idx[:, None] - idx[None, :]).abs() <= size // 2).float() * (alpha / size)
    return band[:, :, None, None].to(device).contiguous(memory_format=torch.channels_last)


def lrn_fp32(x: torch.Tensor, band: torch.Tensor, beta: float, k: float) -> torch.Tensor:
    """Caffe LRN across channels, y = x / (k + alpha/n * sum_window x^2)^beta, in fp32, back in x's dtype.

    The windowed sum of squares is a 1×1 convolution with a banded C×C matrix: oneDNN runs it as a
    GEMM, 3.3x faster than torch's local_response_norm (avg_pool3d) at CaffeNet's norm1, batch 64,
    on the 2-core dev box (14 vs 47 ms), and it has no bf16 gap (torch's LRN has no bf16 CPU kernel).
    """
    # A private fp32 copy: the in-place ops below must never write into x (a tapped pool output).
    xf = x.to(torch.float32, copy=True)
    scale = F.conv2d(xf * xf, band).add_(k)
    if beta == 0.75:  # Caffe's value: s^-0.75 = s^-0.5 * s^-0.25, two cheap roots instead of pow
        scale.rsqrt_()
        xf.mul_(scale)
        scale.sqrt_()
    else:
        scale.pow_(-beta)
    return xf.mul_(scale).to(x.dtype)


def _conv(net: TorchNet, layer: Conv, x: torch.Tensor, inplace_ok: bool) -> torch.Tensor:
    w, b = net.params[layer.name]
    return F.conv2d(x, w, b, stride=layer.stride, padding=layer.pad, groups=layer.groups)


def _relu(net: TorchNet, layer: ReLU, x: torch.Tensor, inplace_ok: bool) -> torch.Tensor:
    return F.relu(x, inplace=inplace_ok)


def _pool(net: TorchNet, layer: MaxPool, x: torch.Tensor, inplace_ok: bool) -> torch.Tensor:
    return F.max_pool2d(x, layer.kernel, layer.stride, layer.pad, ceil_mode=layer.ceil)


def _norm(net: TorchNet, layer: LRN, x: torch.Tensor, inplace_ok: bool) -> torch.Tensor:
    return lrn_fp32(x, net.lrn_bands[layer.name], layer.beta, layer.k)


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

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        super().__init__(spec, tensors, device, dtype)
        if device.type == "cuda" and dtype == torch.float32:
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        inputs = spec.input_shapes()
        self.params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lrn_bands: dict[str, torch.Tensor] = {}
        for layer in spec.layers:
            if isinstance(layer, LRN):
                self.lrn_bands[layer.name] = lrn_band(inputs[layer.name][0], layer.size, layer.alpha, device)
            if layer.param_key is None:
                continue
            w = tensors[f"{layer.param_key}.weight"].to(device=device, dtype=dtype)
            b = tensors[f"{layer.param_key}.bias"].to(device=device, dtype=dtype)
            if w.dim() == 4:
                w = w.contiguous(memory_format=torch.channels_last)
            self.params[layer.name] = (w, b)

    def prepare(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        """NHWC float batch -> NCHW-shaped, channels_last-strided compute tensor on the device."""
        x = images_nhwc.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return x.permute(0, 3, 1, 2)

    def run_layer(self, index: int, x: torch.Tensor, inplace_ok: bool = False) -> torch.Tensor:
        layer: Layer = self.spec.layers[index]
        return OPS[type(layer)](self, layer, x, inplace_ok)

    def plan(self, names: list[str]) -> list[Op]:
        """One op per layer up to the deepest requested one (torch fuses nothing)."""
        wanted = set(names)
        last = max(self.spec.index(n) for n in names)
        ops = []
        for i, layer in enumerate(self.spec.layers[: last + 1]):
            # An in-place ReLU would overwrite a tapped pre-activation (fc7 when fc7 and relu7 are asked).
            inplace = i > 0 and self.spec.layers[i - 1].name not in wanted
            ops.append(Op(layer.name, layer.kind, (layer.name,), partial(self.run_layer, i, inplace_ok=inplace)))
        return ops
