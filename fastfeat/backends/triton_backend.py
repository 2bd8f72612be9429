"""The ``triton`` backend: the whole forward pass in fastfeat's own Triton kernels (fastfeat.kernels).

* Activations are NHWC from the input to pool5 and flat [N, F] after it; no torch conv
  or matmul runs on the hot path.
* Weights are packed once, here: convs to [groups, Cout/g, KH·KW·Cin/g], fc layers to
  [K, N]; fc6's columns are permuted once so it reads pool5's NHWC flatten directly.
* Layers are fused greedily, never past a requested layer (its output must exist):
  conv+ReLU in the conv epilogue, ReLU+max-pool and max-pool+LRN in the pool kernel,
  fc+ReLU in the GEMM epilogue.  ``plan`` names each fused op after the layers it covers.
* Requested conv-side layers are returned as NCHW-shaped views of the NHWC tensors, so
  layer names, shapes and the C×H×W flatten order equal the torch backend's.

On a CPU-only machine it runs under Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported); otherwise it needs CUDA.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..layers import LRN, Conv, Layer, Linear, MaxPool, ReLU
from ..models import ModelSpec
from .base import Backend, register_backend
from .plan import Op, fused_name


@dataclass(frozen=True)
class _Step:
    """One fused op: the layers it covers, which kernel runs it, on which layer's geometry."""

    covers: tuple[Layer, ...]
    kind: str  # conv, fc, pool (+ReLU before, +LRN after), norm or relu
    layer: Layer  # the conv, fc, pool or LRN layer whose parameters the kernel takes
    relu: bool = False
    norm: LRN | None = None


@register_backend
class TritonNet(Backend):
    name = "triton"
    compiles_on_first_call = True  # on a GPU; under the interpreter the first call is merely slow

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        try:
            from fastfeat.kernels import backend_available, interpreter_active
        except ImportError as exc:
            return f"the triton kernels cannot be imported ({exc})"
        ok, why = backend_available()
        if not ok:
            return why
        if device.type == "cpu" and not interpreter_active():
            return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (CPU interpreter)"
        return None

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        from fastfeat import kernels

        super().__init__(spec, tensors, device, dtype)
        self.k = kernels
        inputs = spec.input_shapes()
        self.packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Conv layers run as space-to-depth + tap loop (kernels/conv_s2d.py), decided once with the packing.
        self.s2d_layers: set[str] = set()
        # Few-tile convs sum K by tap segments, split at small batch (kernels/conv_splitk.py): one switch
        # for the whole net, so an image's bits never depend on its batch.
        from fastfeat.kernels.conv_splitk import use_conv_split_k

        self.conv_k_split = use_conv_split_k()
        for layer in spec.layers:
            if layer.param_key is None:
                continue
            w = tensors[f"{layer.param_key}.weight"].to(device)
            # Bias stays fp32: the epilogue adds it in fp32 before the downcast.
            b = tensors[f"{layer.param_key}.bias"].to(device=device, dtype=torch.float32).contiguous()
            if isinstance(layer, Conv) and self._space_to_depth(layer, inputs[layer.name][0]):
                w = kernels.pack_conv_weight_s2d(w, stride=layer.stride, dtype=dtype)
                self.s2d_layers.add(layer.name)
            elif isinstance(layer, Conv):
                w = kernels.pack_conv_weight(w, groups=layer.groups, dtype=dtype)
            else:
                chw = inputs[layer.name]
                w = kernels.pack_linear_weight(w, input_chw=chw if len(chw) == 3 else None, dtype=dtype)
            self.packed[layer.name] = (w, b)
        # Ahead-of-time kernels (libfastfeat_kernels.so, kernels/native.py) or JIT: decided now, logged
        # once, and kept here so that a run can say which path its timings took.
        self.kernel_source = "JIT (Triton interpreter)" if device.type != "cuda" else self._kernel_source()

    @staticmethod
    def _kernel_source() -> str:
        from fastfeat.kernels import native

        native.library()
        return native.describe()

    def prepare(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        return images_nhwc.to(device=self.device, dtype=self.dtype, non_blocking=True).contiguous()

    @staticmethod
    def _space_to_depth(layer: Conv, cin: int) -> bool:
        """The conv variant of this layer: space-to-depth + tap loop (kernels/conv_s2d.py) or the direct one."""
        from fastfeat.kernels.conv_s2d import use_space_to_depth

        return use_space_to_depth(cin, layer.groups, layer.kernel, layer.stride)

    # -- ops ----------------------------------------------------------------------------------------
    def _fuse(self, names: list[str]) -> list[_Step]:
        """Greedy fusion up to the deepest requested layer, never hiding a requested output.

        The one place that maps a layer kind to a kernel: conv(+ReLU), fc(+ReLU), ReLU+pool(+LRN),
        pool(+LRN), LRN; a ReLU that cannot fuse (its input is requested) runs as torch.relu.
        """
        layers = self.spec.layers
        wanted = set(names)
        last = max(self.spec.index(n) for n in names)

        def absorbs(j: int, kind: type) -> bool:
            """Layer j+1 is of ``kind`` and layer j's own output is not requested."""
            return j + 1 <= last and isinstance(layers[j + 1], kind) and layers[j].name not in wanted

        steps: list[_Step] = []
        i = 0
        while i <= last:
            layer = layers[i]
            if isinstance(layer, (Conv, Linear)):
                relu = absorbs(i, ReLU)
                covers = (layer, layers[i + 1]) if relu else (layer,)
                step = _Step(covers, "conv" if isinstance(layer, Conv) else "fc", layer, relu=relu)
            elif isinstance(layer, ReLU) and absorbs(i, MaxPool):
                norm = layers[i + 2] if absorbs(i + 1, LRN) else None
                covers = (layer, layers[i + 1]) + ((norm,) if norm is not None else ())
                step = _Step(covers, "pool", layers[i + 1], relu=True, norm=norm)
            elif isinstance(layer, ReLU):
                step = _Step((layer,), "relu", layer)  # only when the pre-activation is itself requested
            elif isinstance(layer, MaxPool):
                norm = layers[i + 1] if absorbs(i, LRN) else None
                step = _Step((layer,) + ((norm,) if norm is not None else ()), "pool", layer, norm=norm)
            elif isinstance(layer, LRN):
                step = _Step((layer,), "norm", layer)
            else:
                raise ConfigError(f"the triton backend has no kernel for layer kind {layer.kind!r} ({layer.name})")
            steps.append(step)
            i += len(step.covers)
        return steps

    def _lrn(self, norm: LRN | None):
        return None if norm is None else self.k.LRNParams(norm.size, norm.alpha, norm.beta, norm.k)

    def _run(self, step: _Step):
        """The step as a call of the public launcher, checking its input each call (profiling times ops
        one by one; tools record launches through it)."""
        k, layer = self.k, step.layer
        if step.kind == "conv":
            w, b = self.packed[layer.name]
            if layer.name in self.s2d_layers:
                return lambda x: k.conv2d_nhwc_s2d(
                    x, w, b, kernel_size=layer.kernel, stride=layer.stride, padding=layer.pad, relu=step.relu
                )
            return lambda x: k.conv2d_nhwc(
                x, w, b, kernel_size=layer.kernel, stride=layer.stride, padding=layer.pad, groups=layer.groups,
                relu=step.relu, k_split=self.conv_k_split,
            )  # fmt: skip
        if step.kind == "fc":
            w, b = self.packed[layer.name]
            return lambda x: k.linear(x.reshape(x.shape[0], -1), w, b, relu=step.relu)
        if step.kind == "pool":
            lrn = self._lrn(step.norm)
            return lambda x: k.maxpool2d_nhwc(
                x, kernel_size=layer.kernel, stride=layer.stride, padding=layer.pad, ceil_mode=layer.ceil,
                relu=step.relu, lrn=lrn,
            )  # fmt: skip
        if step.kind == "norm":
            return lambda x: k.lrn_nhwc(x, size=layer.size, alpha=layer.alpha, beta=layer.beta, k=layer.k)
        return torch.relu

    def _launch(self, step: _Step, shape: tuple, device: torch.device):
        """(run(x) -> output, output shape): the step planned for inputs of ``shape`` (checks, output
        buffer, kernel arguments made now; see fastfeat.kernels.launch_args.Launch)."""
        k, layer, dtype = self.k, step.layer, self.dtype
        if step.kind == "conv" and layer.name in self.s2d_layers:  # no plan of its own: checks per call
            n, h, w_, c = shape
            _, ho, wo = layer.out_shape((c, h, w_))
            return self._run(step), (n, ho, wo, layer.out)
        if step.kind == "conv":
            w, b = self.packed[layer.name]
            launch = k.plan_conv2d_nhwc(
                shape, dtype, device, w, b, kernel_size=layer.kernel, stride=layer.stride, padding=layer.pad,
                groups=layer.groups, relu=step.relu, k_split=self.conv_k_split,
            )  # fmt: skip
        elif step.kind == "fc":
            w, b = self.packed[layer.name]
            flat = (shape[0], math.prod(shape[1:]))
            gemm = k.plan_linear(flat, dtype, device, w, b, relu=step.relu)
            return (lambda x: gemm(x.view(flat))), tuple(gemm.out.shape)
        elif step.kind == "pool":
            launch = k.plan_maxpool2d_nhwc(
                shape, dtype, device, kernel_size=layer.kernel, stride=layer.stride, padding=layer.pad,
                ceil_mode=layer.ceil, relu=step.relu, lrn=self._lrn(step.norm),
            )  # fmt: skip
        elif step.kind == "norm":
            launch = k.plan_lrn_nhwc(
                shape, dtype, device, size=layer.size, alpha=layer.alpha, beta=layer.beta, k=layer.k
            )
        else:
            return torch.relu, shape
        return launch, tuple(launch.out.shape)

    def plan(self, names: list[str]) -> list[Op]:
        """The fused ops (``_fuse``), each calling its public launcher."""
        ops = []
        for step in self._fuse(names):
            covered = tuple(c.name for c in step.covers)
            ops.append(Op(fused_name(covered), step.covers[0].kind, covered, self._run(step)))
        return ops

    def make_forward(self, names: list[str], x: torch.Tensor):
        """The forward pass planned for inputs like ``x``: every launch checked, its output allocated and
        its arguments bound now, so that a call only launches (see Backend: the outputs are these
        buffers, overwritten by the next call).  Requested conv-side layers come out as NCHW-shaped
        views of the NHWC buffers: the same shapes and C×H×W flatten order as the torch backend's."""
        if x.dim() != 4 or not x.is_contiguous() or x.dtype != self.dtype or x.device.type != self.device.type:
            raise ValueError(
                f"the triton backend takes a contiguous NHWC {self.dtype} batch on {self.device} (see prepare), got "
                f"{tuple(x.shape)} {x.dtype} on {x.device}"
            )
        wanted, shape, device = set(names), tuple(x.shape), x.device
        steps = []
        for step in self._fuse(names):
            run, shape = self._launch(step, shape, device)
            tap = step.covers[-1].name
            steps.append((run, tap if tap in wanted else None))

        def forward(t: torch.Tensor) -> dict[str, torch.Tensor]:
            out = {}
            # Triton launches on the current device: x's, once per forward pass rather than per launch.
            with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
                for run, tap in steps:
                    t = run(t)
                    if tap is not None:
                        out[tap] = t.permute(0, 3, 1, 2) if t.dim() == 4 else t
            return out

        return forward
