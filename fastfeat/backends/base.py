"""The backend protocol (the registry is fastfeat.backends.REGISTRY)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..models import ModelSpec
from . import register_backend  # noqa: F401  (re-exported: backend modules import it from here)
from .plan import Op, run_plan


class Backend(ABC):
    """A forward pass of a :class:`ModelSpec` on one device, in one compute dtype.

    * ``prepare(images)``: a float NHWC host batch -> the tensor the first op takes, on the device;
    * ``plan(names)``: the ops (fused or not) up to the deepest requested layer, each requested
      layer being some op's output; profiling times them one by one;
    * ``forward_intermediates(x, names)``: {name: activation} of the requested layers, NCHW-shaped
      (C×H×W flatten order), computing nothing past the deepest one;
    * ``unavailable(device)``: one line saying why it cannot run here, or None.
    """

    name: ClassVar[str]
    # The first call of an op compiles it (torch.compile, a Triton kernel on a GPU): never time it.
    compiles_on_first_call: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.spec, self.device, self.dtype = spec, device, dtype

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        return None

    @abstractmethod
    def prepare(self, images_nhwc: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def plan(self, names: list[str]) -> list[Op]: ...

    @torch.inference_mode()
    def forward_intermediates(self, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        return run_plan(self.plan(names), x, names)
