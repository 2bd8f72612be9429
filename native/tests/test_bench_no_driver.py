"""ctest native_bench_no_driver: without a CUDA driver fastfeat-layer-bench says "no CUDA driver" and exits
with its "no usable GPU" status (2), whichever split-K reduce it is asked for; a bad command line exits 64
with a usage line."""

from __future__ import annotations

import subprocess
import sys


def main() -> int:
    bench = sys.argv[1]
    proc = subprocess.run(
        [bench, "--model", "caffenet", "--batch-sizes", "1"], capture_output=True, text=True, timeout=60
    )
    failures = []
    if proc.returncode != 2:
        failures.append(f"exit status {proc.returncode}, expected 2")
    if "no CUDA driver" not in proc.stderr:
        failures.append(f"stderr lacks 'no CUDA driver': {proc.stderr!r}")
    usage = subprocess.run([bench, "--batch-sizes", "0"], capture_output=True, text=True, timeout=60)
    if usage.returncode != 64 or "usage:" not in usage.stderr:
        failures.append(f"--batch-sizes 0: exit {usage.returncode}, stderr {usage.stderr!r}")
    unknown = subprocess.run([bench, "--model", "lenet"], capture_output=True, text=True, timeout=60)
    if unknown.returncode != 64 or "caffenet" not in unknown.stderr:
        failures.append(f"--model lenet: exit {unknown.returncode}, stderr {unknown.stderr!r}")
    reduce = subprocess.run([bench, "--splitk-reduce", "atomic"], capture_output=True, text=True, timeout=60)
    if reduce.returncode != 64 or "--splitk-reduce must be separate, fused or both" not in reduce.stderr:
        failures.append(f"--splitk-reduce atomic: exit {reduce.returncode}, stderr {reduce.stderr!r}")
    both = subprocess.run([bench, "--splitk-reduce", "both", "--batch-sizes", "1"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    if both.returncode != 2 or "no CUDA driver" not in both.stderr:
        failures.append(f"--splitk-reduce both without a driver: exit {both.returncode}, stderr {both.stderr!r}")
    for f in failures:
        print("FAIL", f)
    print(proc.stderr.strip())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
