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

import torch

from ..errors import ConfigError
from ..layers import LRN, Conv, Linear, MaxPool, ReLU
from ..models import ModelSpec
from .base import Backend, register_backend
from .plan import Op, fused_name


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
        for layer in spec.layers:
            if layer.param_key is None:
                continue
            w = tensors[f"{layer.param_key}.weight"].to(device)
            # Bias stays fp32: the epilogue adds it in fp32 before the downcast.
            b = tensors[f"{layer.param_key}.bias"].to(device=device, dtype=torch.float32).contiguous()
            if isinstance(layer, Conv):
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

    # -- ops ----------------------------------------------------------------------------------------
    def _conv(self, layer: Conv, relu: bool):
        w, b = self.packed[layer.name]
        return lambda x: self.k.conv2d_nhwc(
            x, w, b, kernel_size=layer.kernel, stride=layer.stride, padding=layer.pad, groups=layer.groups, relu=relu
        )

    def _pool(self, layer: MaxPool, relu: bool, norm: LRN | None):
        lrn = None if norm is None else self.k.LRNParams(norm.size, norm.alpha, norm.beta, norm.k)
        return lambda x: self.k.maxpool2d_nhwc(
            x,
            kernel_size=layer.kernel,
            stride=layer.stride,
            padding=layer.pad,
            ceil_mode=layer.ceil,
            relu=relu,
            lrn=lrn,
        )

    def _norm(self, layer: LRN):
        return lambda x: self.k.lrn_nhwc(x, size=layer.size, alpha=layer.alpha, beta=layer.beta, k=layer.k)

    def _fc(self, layer: Linear, relu: bool):
        w, b = self.packed[layer.name]
        return lambda x: self.k.linear(x.reshape(x.shape[0], -1), w, b, relu=relu)

    def plan(self, names: list[str]) -> list[Op]:
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

        ops: list[Op] = []
        i = 0
        while i <= last:
            layer = layers[i]
            covers = [layer]
            if isinstance(layer, (Conv, Linear)):
                relu = absorbs(i, ReLU)
                covers += [layers[i + 1]] if relu else []
                run = self._conv(layer, relu) if isinstance(layer, Conv) else self._fc(layer, relu)
            elif isinstance(layer, ReLU) and absorbs(i, MaxPool):
                covers += [layers[i + 1]] + ([layers[i + 2]] if absorbs(i + 1, LRN) else [])
                run = self._pool(covers[1], relu=True, norm=covers[2] if len(covers) > 2 else None)
            elif isinstance(layer, ReLU):
                run = torch.relu  # only when the pre-activation is itself requested
            elif isinstance(layer, MaxPool):
                covers += [layers[i + 1]] if absorbs(i, LRN) else []
                run = self._pool(layer, relu=False, norm=covers[1] if len(covers) > 1 else None)
            elif isinstance(layer, LRN):
                run = self._norm(layer)
            else:
                raise ConfigError(f"the triton backend has no kernel for layer kind {layer.kind!r} ({layer.name})")
            names_covered = tuple(c.name for c in covers)
            ops.append(Op(fused_name(names_covered), layer.kind, names_covered, run))
            i += len(covers)
        return ops

    @torch.inference_mode()
    def forward_intermediates(self, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        out = super().forward_intermediates(x, names)
        # NHWC -> NCHW-shaped views: same shapes and C×H×W flatten order as the torch backend.
        return {n: t.permute(0, 3, 1, 2) if t.dim() == 4 else t for n, t in out.items()}
