"""Forward-pass backends.  Each exposes ``prepare(nhwc_batch)`` and ``forward_intermediates``."""

from __future__ import annotations

import torch

from ..models import ModelSpec

BACKENDS = ("torch", "triton")


def make_backend(
    name: str, spec: ModelSpec, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
):
    if name == "torch":
        from .torch_backend import TorchNet

        return TorchNet(spec, tensors, device, dtype)
    if name == "triton":
        from .triton_backend import TritonNet

        return TritonNet(spec, tensors, device, dtype)
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
