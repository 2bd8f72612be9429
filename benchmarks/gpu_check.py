"""The GPU check, one script for a lent CUDA machine (about 5 minutes on an H200).

1. runs every kernel test and the triton-backend tests on the GPU, bf16 included;
2. prints per-layer time tables, triton vs torch eager (cuDNN/cuBLAS) vs torch.compile,
   at batch 1, 64 and 256 in bf16, for caffenet and alexnet (``fastfeat.profile``);
3. prints the whole forward pass in img/s for each backend (CUDA events);
4. writes everything as JSON (to $OUT when set, and benchmarks/results/gpu_check.json)
   and appends the forward-pass rows to benchmarks/results/results.csv.

Runs from a source checkout without installing (the device machine has torch, triton
and torchvision but no DALI and no network):

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py [--budget-s 290]

The targets it reports against (issue 3, H200, bf16, batch 256): whole forward
>= 1.3x torch eager; each conv <= 1.1x cuDNN's time; fc layers at least as fast as cuBLAS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkout import make_importable  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))


class _Counts:
    """A pytest plugin that counts outcomes, so the JSON says what passed."""

    def __init__(self):
        self.counts = {"passed": 0, "failed": 0, "skipped": 0}
        self.failures: list[str] = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.counts[report.outcome] = self.counts.get(report.outcome, 0) + 1
            if report.outcome == "failed":
                self.failures.append(report.nodeid)


def run_tests() -> dict:
    import pytest

    counts = _Counts()
    t0 = time.perf_counter()
    code = pytest.main(
        ["-q", "-p", "no:cacheprovider", os.path.join(ROOT, "tests", "kernels"),
         os.path.join(ROOT, "tests", "test_triton_backend.py")],
        plugins=[counts],
    )  # fmt: skip
    return {"exit_code": int(code), **counts.counts, "failures": counts.failures, "seconds": time.perf_counter() - t0}


def whole_forward(model: str, backend: str, batch: int, iters: int = 20) -> float:
    """img/s of the full forward pass (to fc8), CUDA events, after warm-up (and compilation)."""
    import torch

    from fastfeat.backends import make_backend
    from fastfeat.models import get_model
    from fastfeat.weights import load_weights

    spec = get_model(model)
    dev = torch.device("cuda")
    net = make_backend("torch" if backend == "compile" else backend, spec, load_weights(spec, "random:0").tensors,
                       dev, torch.bfloat16)  # fmt: skip
    x = net.prepare(torch.randn(batch, spec.input_size, spec.input_size, 3, device=dev))
    fwd = lambda t: net.forward_intermediates(t, ["fc8"])
    if backend == "compile":
        fwd = torch.compile(fwd, mode="max-autotune-no-cudagraphs")
    for _ in range(3):
        fwd(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fwd(x)
    end.record()
    torch.cuda.synchronize()
    return batch * iters / (start.elapsed_time(end) / 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=290, help="stop starting new measurements after this")
    ap.add_argument("--batch-sizes", default="1,64,256")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    make_importable()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; this script is for a GPU machine")
    from fastfeat.profile import format_table, profile

    sys.path.insert(0, BENCH)
    from results import append, device_name

    dev_name = device_name("cuda")
    report: dict = {"device": dev_name, "torch": torch.__version__, "capability": torch.cuda.get_device_capability()}
    import triton

    report["triton"] = triton.__version__
    out_dir = os.environ.get("OUT")

    def save():
        paths = [os.path.join(BENCH, "results", "gpu_check.json")] + (
            [os.path.join(out_dir, "gpu_check.json")] if out_dir else []
        )
        for p in paths:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w") as f:
                json.dump(report, f, indent=1, default=str)

    if not args.skip_tests:
        report["tests"] = run_tests()
        print(f"kernel tests on GPU: {report['tests']}", flush=True)
        save()

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    report["profiles"], report["forward_img_per_s"] = [], {}
    for model in ("caffenet", "alexnet"):
        for backends in (("torch", "triton"), ("compile",)):
            if time.perf_counter() - t_start > args.budget_s:
                report.setdefault("skipped", []).append(f"{model} {backends}: out of time budget")
                continue
            res = profile(model, backends=backends, device="cuda", precision="bf16", batch_sizes=sizes, repeat=20,
                          warmup=3, log=lambda m: print(m, flush=True))  # fmt: skip
            report["profiles"] += res
            print(format_table(res), flush=True)
            save()
        for backend in ("torch", "triton", "compile"):
            for batch in sizes:
                if time.perf_counter() - t_start > args.budget_s:
                    continue
                key = f"{model} {backend} b{batch}"
                report["forward_img_per_s"][key] = ips = whole_forward(model, backend, batch)
                print(f"forward {key}: {ips:,.0f} img/s", flush=True)
                append([{"kernel": f"{model}_forward", "provider": backend, "shape": f"{model} full",
                         "dtype": "bf16", "batch": batch, "metric": "img/s", "p20": "", "p50": round(ips, 1),
                         "p80": "", "device": dev_name}])  # fmt: skip
            save()
    f = report["forward_img_per_s"]
    report["targets_b256"] = {
        m: {"triton_vs_eager": f.get(f"{m} triton b256", 0) / f[f"{m} torch b256"]}
        for m in ("caffenet", "alexnet") if f.get(f"{m} torch b256")
    }  # fmt: skip
    save()
    print(json.dumps(report["targets_b256"], indent=1))
    print(f"gpu_check done in {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
