"""ctest native_gpu_kernels_match_python (GPU only; exit 77 = skipped without one): every op of the
shipped networks' forward plans through the AOT library is bit-identical to the same op JIT-compiled by
Triton from the Python kernels, on the same inputs.

Both run the same config (the JIT with FASTFEAT_AUTOTUNE=0 takes the first config the prune rules keep,
which is the one the build compiled), so they run the same machine code up to the batch-generic
specialisation of the pixel/row counts, which changes no arithmetic. Each op is run through the real
launchers twice, once with the library disabled and once enabled (``fastfeat.kernels.native.reset``),
and the library must have launched it. FASTFEAT_NATIVE_GPU_CASES ("model:dtype,dtype;model:dtype")
widens or narrows the set (default: every op of CaffeNet in bf16, fp16 and fp32, and AlexNet and VGG-16
in bf16, at batch 1 and 3; the JIT compiles dominate the run time).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import EXIT_SKIP, open_on_gpu  # noqa: E402

os.environ.pop("TRITON_INTERPRET", None)
os.environ["FASTFEAT_AUTOTUNE"] = "0"  # the JIT side runs the build's config


def main() -> int:
    import torch

    from fastfeat.backends.triton_backend import TritonNet
    from fastfeat.kernels import native
    from fastfeat.models import get_model
    from fastfeat.runtime import PRECISIONS
    from fastfeat.weights import load_weights

    opened = open_on_gpu()
    if opened is None:
        return EXIT_SKIP
    dev, lib = opened
    cases = os.environ.get("FASTFEAT_NATIVE_GPU_CASES", "caffenet:bf16,fp16,fp32;alexnet:bf16;vgg16:bf16")
    failures, checked = [], 0
    for case in cases.split(";"):
        model, dtypes = case.split(":")
        spec = get_model(model)
        tensors = load_weights(spec, "random:0").tensors
        for precision in dtypes.split(","):
            net = TritonNet(spec, tensors, dev, PRECISIONS[precision])
            gen = torch.Generator().manual_seed(0)
            for batch in (1, 3):
                x0 = torch.randn(batch, spec.input_size, spec.input_size, 3, generator=gen)
                for names in ([spec.layer_names[-1]], spec.layer_names):
                    x = net.prepare(x0)
                    for op in net.plan(names):
                        if op.run is torch.relu:
                            x = op.run(x)
                            continue
                        os.environ[native.ENV_ENABLE] = "0"
                        native.reset()
                        y_jit = op.run(x)
                        os.environ[native.ENV_ENABLE] = "1"
                        native.reset()
                        y_aot = op.run(x)
                        torch.cuda.synchronize()
                        where = f"{model} {precision} b{batch} {op.name}"
                        st = native.stats()
                        if st["aot_launches"] == 0:
                            failures.append(f"{where}: the library did not launch it ({native.describe()})")
                        elif not torch.equal(y_jit, y_aot):
                            diff = (y_jit.float() - y_aot.float()).abs().max().item()
                            failures.append(f"{where}: differs from the JIT kernel (max abs diff {diff:.3g})")
                        checked += 1
                        x = y_jit
            del net
    for f in failures:
        print("FAIL", f)
    print(f"{checked} ops compared, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
