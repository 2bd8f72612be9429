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

from ..models import ModelSpec
from .plan import Op, fused_name, run_plan


class TritonNet:
    backend = "triton"

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        from fastfeat import kernels

        ok, why = kernels.backend_available()
        if not ok:
            raise ValueError(why)
        self.k = kernels
        self.spec, self.device, self.dtype = spec, device, dtype
        inputs = spec.input_shapes()
        self.packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in spec.layers:
            if layer.param_key is None:
                continue
            w = tensors[f"{layer.param_key}.weight"].to(device)
            # Bias stays fp32: the epilogue adds it in fp32 before the downcast.
            b = tensors[f"{layer.param_key}.bias"].to(device=device, dtype=torch.float32).contiguous()
            if layer.kind == "conv":
                w = kernels.pack_conv_weight(w, groups=layer.params["groups"], dtype=dtype)
            else:
                chw = inputs[layer.name]
                w = kernels.pack_linear_weight(w, input_chw=chw if len(chw) == 3 else None, dtype=dtype)
            self.packed[layer.name] = (w, b)

    def prepare(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        return images_nhwc.to(device=self.device, dtype=self.dtype, non_blocking=True).contiguous()

    # -- ops ----------------------------------------------------------------------------------------
    def _conv(self, name: str, relu: bool):
        p = self.spec.layers[self.spec.index(name)].params
        w, b = self.packed[name]
        return lambda x: self.k.conv2d_nhwc(
            x, w, b, kernel_size=p["kernel"], stride=p["stride"], padding=p["pad"], groups=p["groups"], relu=relu
        )

    def _pool(self, name: str, relu: bool, norm: str | None):
        p = self.spec.layers[self.spec.index(name)].params
        lrn = None
        if norm is not None:
            q = self.spec.layers[self.spec.index(norm)].params
            lrn = self.k.LRNParams(q["size"], q["alpha"], q["beta"], q["k"])
        return lambda x: self.k.maxpool2d_nhwc(
            x, kernel_size=p["kernel"], stride=p["stride"], ceil_mode=p["ceil"], relu=relu, lrn=lrn
        )

    def _norm(self, name: str):
        q = self.spec.layers[self.spec.index(name)].params
        return lambda x: self.k.lrn_nhwc(x, size=q["size"], alpha=q["alpha"], beta=q["beta"], k=q["k"])

    def _fc(self, name: str, relu: bool):
        w, b = self.packed[name]
        return lambda x: self.k.linear(x.reshape(x.shape[0], -1), w, b, relu=relu)

    def plan(self, names: list[str]) -> list[Op]:
        """Greedy fusion up to the deepest requested layer, never hiding a requested output."""
        layers = self.spec.layers
        wanted = set(names)
        last = max(self.spec.index(n) for n in names)
        ops: list[Op] = []
        i = 0

        def can_absorb(j: int, kind: str) -> bool:
            """Layer j+1 is of ``kind`` and layer j's own output is not requested."""
            return j + 1 <= last and layers[j + 1].kind == kind and layers[j].name not in wanted

        while i <= last:
            layer = layers[i]
            covers = [layer.name]
            if layer.kind == "conv":
                relu = can_absorb(i, "relu")
                covers += [layers[i + 1].name] if relu else []
                run = self._conv(layer.name, relu)
            elif layer.kind == "fc":
                relu = can_absorb(i, "relu")
                covers += [layers[i + 1].name] if relu else []
                run = self._fc(layer.name, relu)
            elif layer.kind == "relu" and can_absorb(i, "pool"):
                pool = layers[i + 1].name
                norm = layers[i + 2].name if can_absorb(i + 1, "norm") else None
                covers += [pool] + ([norm] if norm else [])
                run = self._pool(pool, relu=True, norm=norm)
            elif layer.kind == "relu":
                run = torch.relu  # only when the pre-activation is itself requested
            elif layer.kind == "pool":
                norm = layers[i + 1].name if can_absorb(i, "norm") else None
                covers += [norm] if norm else []
                run = self._pool(layer.name, relu=False, norm=norm)
            elif layer.kind == "norm":
                run = self._norm(layer.name)
            else:
                raise ValueError(f"unknown layer kind {layer.kind!r}")
            ops.append(Op(fused_name(covers), layer.kind, tuple(covers), run))
            i += len(covers)
        return ops

    @torch.inference_mode()
    def forward_intermediates(self, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        out = run_plan(self.plan(names), x, names)
        # NHWC -> NCHW-shaped views: same shapes and C×H×W flatten order as the torch backend.
        return {n: t.permute(0, 3, 1, 2) if t.dim() == 4 else t for n, t in out.items()}
