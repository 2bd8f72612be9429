"""fastfeat.kernels: Triton kernels for the AlexNet/CaffeNet forward pass."""

from __future__ import annotations

from .autotune import interpreter_active
from .conv import conv2d_nhwc, conv_output_size, pack_conv_weight
from .gemm import linear, pack_linear_weight
from .lrn import LRNParams, lrn_nhwc
from .pool import maxpool2d_nhwc, pool_output_size

__all__ = [
    "LRNParams",
    "backend_available",
    "conv2d_nhwc",
    "conv_output_size",
    "interpreter_active",
    "linear",
    "lrn_nhwc",
    "maxpool2d_nhwc",
    "pack_conv_weight",
    "pack_linear_weight",
    "pool_output_size",
]


def backend_available() -> tuple[bool, str]:
    """(True, "") when the kernels can run: a CUDA GPU, or Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    if interpreter_active():
        return True, ""
    import torch

    if torch.cuda.is_available():
        return True, ""
    return False, "the triton backend needs a CUDA GPU or TRITON_INTERPRET=1 (CPU interpreter)"
