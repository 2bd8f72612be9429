"""Host time per forward pass: what the Python side costs, apart from the GPU's time.

A host-side timer (perf_counter) around each forward pass while the GPU is still busy with work queued
before it (a ``torch.cuda._sleep`` spin kernel): every launch only queues, so the time measured is the
host's alone -- the plan lookup, the launchers, the autotuner's cache lookup, ctypes where the AOT
library runs -- never the kernels'.  The spin is sized to outlast the timed calls, and their launches
stay far below the launch queue's depth (~1,000), which would otherwise block the host.

On a CPU (the Triton interpreter, torch on oneDNN) the "forward pass" computes on the host, so the
figure means nothing there: ``gpu_check --dry-run`` only proves the code runs.

    python benchmarks/host_time.py --model alexnet --backend triton --batch 64     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

# GPU clock cycles the spin kernel runs: ~0.1-0.2 s at 1-2 GHz, far above CALLS forward passes' host time.
SPIN_CYCLES = 300_000_000
CALLS = 20  # 20 AlexNet passes = ~300 launches: well inside the launch queue


def host_ms_per_forward(forward: Callable[[], object], device, calls: int = CALLS) -> dict:
    """Median and min host ms of ``forward()`` over ``calls`` calls queued behind a busy GPU.

    ``forward`` must be warmed up already (compiled, autotuned, planned): the first call would time the JIT.
    """
    import torch

    cuda = getattr(device, "type", str(device)) == "cuda"
    times = []
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda._sleep(SPIN_CYCLES)  # the GPU is busy: what follows only queues
    for _ in range(calls):
        t0 = time.perf_counter()
        forward()
        times.append((time.perf_counter() - t0) * 1e3)
    queued_behind_spin = True
    if cuda:
        # Had the spin ended before the last call, the later calls might have waited on the GPU: say so.
        queued_behind_spin = not torch.cuda.current_stream(device).query()
        torch.cuda.synchronize(device)
    return {
        "host_ms_median": statistics.median(times),
        "host_ms_min": min(times),
        "calls": calls,
        "gpu_busy_throughout": queued_behind_spin if cuda else None,
        "meaningful": cuda,  # on a CPU the forward pass computes on the host
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--layers", default="relu6,relu7")
    args = ap.parse_args(argv)
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from checkout import make_importable

    make_importable()
    import torch

    from fastfeat.backends import make_backend
    from fastfeat.models import get_model
    from fastfeat.runtime import PRECISIONS
    from fastfeat.weights import load_weights

    dev = torch.device("cuda")
    spec = get_model(args.model)
    net = make_backend(args.backend, spec, load_weights(spec, "random:0").tensors, dev, PRECISIONS[args.precision])
    x = net.prepare(torch.randn(args.batch, spec.input_size, spec.input_size, 3))
    names = args.layers.split(",")
    for _ in range(3):
        net.forward_intermediates(x, names)
    print(json.dumps(host_ms_per_forward(lambda: net.forward_intermediates(x, names), dev)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
