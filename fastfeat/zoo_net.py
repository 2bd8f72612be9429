"""The forward pass of a torchvision/timm model (fastfeat.zoo) on the torch, compile or triton backend.

torch and compile (:class:`ZooNet`): the library's own module, in the run's compute dtype, runs the taps
(fastfeat.taps) and each tap is reduced by the spec's ``--pool``; the result is what a layer-list backend
returns: {name: activation}, one row per image, C×H×W (or T×C) flatten order.  ``compile`` wraps that
function in torch.compile.  triton (:class:`ZooTritonNet`): the model's layer table (fastfeat.zoo_table)
on fastfeat's own kernels, each tap read from its layer's output and pooled the same way.
"""

from __future__ import annotations

import torch

from .backends.base import Backend
from .backends.plan import Op
from .errors import ConfigError
from .taps import tap_function


def pool_tap(t: torch.Tensor, pool: str) -> torch.Tensor:
    """One tap's batch [N, ...] reduced as fastfeat.zoo.pooled_shape says."""
    if t.dim() <= 2 or pool == "none":
        return t
    if t.dim() == 4:  # N×C×H×W
        return t.mean(dim=(2, 3)) if pool == "avg" else t.amax(dim=(2, 3))
    if t.dim() == 3:  # N×T×C
        if pool == "cls":
            return t[:, 0]
        return t.mean(dim=1) if pool == "avg" else t.amax(dim=1)
    raise ValueError(f"cannot pool a tap of shape {tuple(t.shape)}")


class ZooNet(Backend):
    """A library module as a backend; ``backend`` is "torch" or "compile" (its name in the metadata)."""

    name = "torch"

    def __init__(self, spec, tensors, device, dtype, backend: str = "torch", compile_mode: str | None = None):
        super().__init__(spec, tensors, device, dtype)
        if backend not in ("torch", "compile"):  # triton: ZooTritonNet (fastfeat.model_lookup picks)
            raise ConfigError(f"a library module runs on the torch or compile backend, not {backend!r}")
        self.backend, self.compile_mode = backend, compile_mode
        self.compiles_on_first_call = backend == "compile"
        if device.type == "cuda" and dtype == torch.float32:
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        module = spec.build_module()
        module.load_state_dict(tensors, strict=True)
        self.module = module.to(device=device, dtype=dtype).eval()

    def prepare(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        x = images_nhwc.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return x.permute(0, 3, 1, 2)

    def plan(self, names: list[str]) -> list[Op]:
        """One op: the library's forward up to the taps (its modules are not fastfeat's layers)."""
        run = self._taps(names)
        return [Op("forward", "model", tuple(names), run)]

    def _taps(self, names: list[str]):
        taps, pool = tap_function(self.spec.library, self.module, names), self.spec.pool

        def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = taps(x)
            return {n: pool_tap(out[n], pool).contiguous() for n in names}

        return run

    def make_forward(self, names: list[str], x: torch.Tensor):
        run = self._taps(names)
        if self.backend == "compile":
            kwargs = {"mode": self.compile_mode} if self.compile_mode else {}
            run = torch.compile(run, dynamic=False, **kwargs)
        return run


class ZooTritonNet(Backend):
    """A torchvision model translated into a layer table (fastfeat.zoo_table), run by the triton backend
    (fastfeat.backends.triton_backend.TritonNet) on torchvision's own state dict."""

    name = "triton"
    compiles_on_first_call = True

    def __init__(self, spec, tensors, device, dtype):
        from .backends.triton_backend import TritonNet
        from .zoo_table import NotTranslatable, table_for, triton_refusal

        super().__init__(spec, tensors, device, dtype)
        try:
            table = table_for(spec)
        except NotTranslatable:
            raise ConfigError(triton_refusal(spec)) from None
        self.sources = table.sources
        self.net = TritonNet(table.spec, tensors, device, dtype)  # its kernel_source: ahead-of-time or JIT

    def prepare(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        return self.net.prepare(images_nhwc)

    def plan(self, names: list[str]) -> list[Op]:
        """One op, as ZooNet's (the table's own ops are TritonNet's ``plan`` of the tapped layers)."""
        return [Op("forward", "model", tuple(names), lambda x: self.make_forward(names, x)(x))]

    def make_forward(self, names: list[str], x: torch.Tensor):
        layers = sorted({self.sources[n] for n in names}, key=self.net.spec.index)
        run_layers = self.net.forward_plan(layers, x)
        raw, pool, sources = self.spec.raw_shapes, self.spec.pool, self.sources

        def run(t: torch.Tensor) -> dict[str, torch.Tensor]:
            out = run_layers(t)
            # A conv-side layer comes out as an NCHW view of an NHWC buffer: the reshape to the tap's own
            # shape (flatten's C×H×W row) and contiguous() copy it in the torch backend's order.
            return {n: pool_tap(out[sources[n]].reshape(t.shape[0], *raw[n]), pool).contiguous() for n in names}

        return run
