"""fastfeat.kernels: Triton kernels for the AlexNet/CaffeNet/VGG forward pass.

A leaf package: it imports nothing of fastfeat.  The names below are loaded on first use, so that
``fastfeat.kernels.sizes`` (pure arithmetic, shared with the model specs) can be imported without
importing Triton, which must only be imported after TRITON_INTERPRET is settled.
"""

from __future__ import annotations

import importlib

# public name -> submodule that defines it
_EXPORTS = {
    "interpreter_active": "autotune",
    "conv2d_nhwc": "conv",
    "plan_conv2d_nhwc": "conv",
    "pack_conv_weight": "conv",
    "conv2d_nhwc_s2d": "conv_s2d",
    "pack_conv_weight_s2d": "conv_s2d",
    "linear": "gemm",
    "plan_linear": "gemm",
    "pack_linear_weight": "gemm",
    "LRNParams": "lrn",
    "lrn_nhwc": "lrn",
    "plan_lrn_nhwc": "lrn",
    "maxpool2d_nhwc": "pool",
    "plan_maxpool2d_nhwc": "pool",
    "conv_output_size": "sizes",
    "pool_output_size": "sizes",
}

__all__ = sorted([*_EXPORTS, "backend_available"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def backend_available() -> tuple[bool, str]:
    """(True, "") when the kernels can run: a CUDA GPU, or Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    from .autotune import interpreter_active

    if interpreter_active():
        return True, ""
    import torch

    if torch.cuda.is_available():
        return True, ""
    return False, "the triton backend needs a CUDA GPU or TRITON_INTERPRET=1 (CPU interpreter)"
