"""ctest native_gpu_forward_matches_torch (GPU only; exit 77 = skipped without one): the triton backend's
whole forward with the AOT library agrees with the torch backend within the tolerances of the GPU check
(benchmarks/gpu_check.py TOLERANCES, from tests/test_triton_backend.py), every layer launched by the
library (no JIT fallback)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import EXIT_SKIP, open_on_gpu  # noqa: E402

os.environ.pop("TRITON_INTERPRET", None)
# Relative L2 error per tap allowed against torch (benchmarks/gpu_check.py TOLERANCES).
TOLERANCES = {"fp32": 1e-5, "fp16": 3e-3, "bf16": 2e-2}


def main() -> int:
    import torch

    from fastfeat.backends import make_backend
    from fastfeat.kernels import native
    from fastfeat.models import get_model, list_models
    from fastfeat.runtime import PRECISIONS
    from fastfeat.weights import load_weights

    opened = open_on_gpu()
    if opened is None:
        return EXIT_SKIP
    dev, lib = opened
    failures = []
    for model in list_models():
        spec = get_model(model)
        tensors = load_weights(spec, "random:0").tensors
        taps = [n for n in spec.layer_names if n.startswith(("conv", "pool", "norm", "fc"))]
        x = torch.randn(4, spec.input_size, spec.input_size, 3, generator=torch.Generator().manual_seed(1))
        for precision in ("bf16", "fp32"):
            outs = {}
            native.reset()
            for backend in ("triton", "torch"):
                net = make_backend(backend, spec, tensors, dev, PRECISIONS[precision])
                acts = net.forward_intermediates(net.prepare(x), taps)
                outs[backend] = {t: acts[t].reshape(len(x), -1).double().cpu() for t in taps}
                del net, acts
            st = native.stats()
            if st["jit_fallbacks"] or not st["aot_launches"]:
                failures.append(f"{model} {precision}: not all launches went through the library: {st}")
            errors = {t: ((outs["triton"][t] - outs["torch"][t]).norm() / outs["torch"][t].norm()).item() for t in taps}
            worst = max(errors, key=errors.get)
            ok = errors[worst] <= TOLERANCES[precision]
            print(
                f"{model} {precision}: worst {worst} {errors[worst]:.2e} ({'ok' if ok else 'FAIL'}); {native.describe()}"
            )
            if not ok:
                failures.append(
                    f"{model} {precision}: {worst} rel. error {errors[worst]:.2e} > {TOLERANCES[precision]}"
                )
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
