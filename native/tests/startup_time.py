"""Start-up time of the triton backend: seconds from process start to the first forward output (CaffeNet,
bf16, batch 1), with the AOT library (FASTFEAT_NATIVE=1) or without it (FASTFEAT_NATIVE=0: JIT compile
and autotune, with an empty Triton cache). Prints one JSON line. GPU only; benchmarks/gpu_check.py runs it.

    FASTFEAT_NATIVE=0 TRITON_CACHE_DIR=$(mktemp -d) python native/tests/startup_time.py
"""

from __future__ import annotations

import time

START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> int:
    import torch

    from fastfeat.backends import make_backend
    from fastfeat.kernels import native
    from fastfeat.models import get_model
    from fastfeat.runtime import PRECISIONS
    from fastfeat.weights import load_weights

    model = os.environ.get("FASTFEAT_STARTUP_MODEL", "caffenet")
    spec = get_model(model)
    tensors = load_weights(spec, "random:0").tensors
    net = make_backend("triton", spec, tensors, torch.device("cuda"), PRECISIONS["bf16"])
    x = net.prepare(torch.randn(1, spec.input_size, spec.input_size, 3))
    first = time.perf_counter()
    y = net.forward_intermediates(x, [spec.layer_names[-1]])[spec.layer_names[-1]]
    torch.cuda.synchronize()
    done = time.perf_counter()
    t0 = time.perf_counter()
    net.forward_intermediates(x, [spec.layer_names[-1]])
    torch.cuda.synchronize()
    steady = time.perf_counter() - t0
    print(json.dumps({"model": model, "native": os.environ.get(native.ENV_ENABLE, "1") != "0",
                      "seconds_to_first_output": round(done - START, 3), "first_forward_s": round(done - first, 3),
                      "second_forward_s": round(steady, 4), "output_shape": list(y.shape),
                      "kernels": native.describe(), "stats": native.stats()}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
