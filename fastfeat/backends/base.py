"""The backend protocol (the registry is fastfeat.backends.REGISTRY)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
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

    The forward pass is planned once per (requested layers, input shape, strides, dtype, device) and
    the plan cached (``forward_plan``; ``plans_made`` counts them); a backend's ``make_forward`` may
    check, allocate and precompute everything there, so that a call only launches.  Ownership: what
    ``forward_intermediates`` returns may be the plan's buffers, overwritten by the next call with the
    same plan: copy what must outlive it (``fastfeat.forward.Forward`` copies to the host at once).
    """

    name: ClassVar[str]
    # The first call of an op compiles it (torch.compile, a Triton kernel on a GPU): never time it.
    compiles_on_first_call: ClassVar[bool] = False

    # Plans kept per backend (a server's batch buckets times a few layer sets); the oldest goes first.
    MAX_PLANS: ClassVar[int] = 16

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.spec, self.device, self.dtype = spec, device, dtype
        self._plans: OrderedDict[tuple, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = OrderedDict()
        self.plans_made = 0

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        return None

    @abstractmethod
    def prepare(self, images_nhwc: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def plan(self, names: list[str]) -> list[Op]: ...

    def make_forward(self, names: list[str], x: torch.Tensor) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        """The forward pass for inputs like ``x``: ``run(x) -> {name: activation}`` (default: the ops of
        ``plan(names)`` one after the other)."""
        ops = self.plan(names)
        return lambda t: run_plan(ops, t, names)

    def forward_plan(self, names: list[str], x: torch.Tensor) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        """The cached ``make_forward(names, x)`` for x's shape, strides, dtype and device."""
        key = (tuple(names), tuple(x.shape), x.stride(), x.dtype, x.device)
        run = self._plans.get(key)
        if run is None:
            run = self.make_forward(list(names), x)
            self.plans_made += 1
            while len(self._plans) >= self.MAX_PLANS:
                self._plans.popitem(last=False)
            self._plans[key] = run
        else:
            self._plans.move_to_end(key)
        return run

    @torch.inference_mode()
    def forward_intermediates(self, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        return self.forward_plan(names, x)(x)
