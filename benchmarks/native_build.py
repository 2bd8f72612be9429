"""How long the native library takes to build: cold, with a filled cache, and a no-op rebuild.

    flock /tmp/bench.lock python benchmarks/native_build.py --json benchmarks/results/native_build.json

Each build runs in a fresh temporary build directory against a fresh, empty AOT cache
(``-DFASTFEAT_AOT_CACHE=``), so the user's ``~/.cache/fastfeat/aot`` is neither used nor touched, and
with ``-DFASTFEAT_COPY_TO_PACKAGE=OFF`` so the checkout's ``kernels/`` is left as it is. Three timings,
in order: **cold** (configure + build, empty cache and build directory: every kernel compiled),
**clean build, warm cache** (a second empty build directory, the same cache: recording, emission and
linking only), and **no-op** (``cmake --build`` again in that directory). For each, the wall time and
the CPU seconds of the child processes (user + system, from ``getrusage``), then the library's size and
the cache's. The cold build compiles a few hundred kernels on every core it is given: minutes of all of
them, so run it on a quiet machine and under the benchmark lock. ``--models``/``--dtypes``/``--targets``
restrict the matrix as the CMake options of the same names do (README: Native library).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(command: list[str]) -> dict:
    """Run ``command``; wall time and the CPU time of its process tree (the children's rusage delta)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"native_build: {' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 1)}


def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def build(build_dir: Path, cache: Path, args: argparse.Namespace) -> dict:
    """Configure and build in ``build_dir``: one timing covering both (a user's first build does both)."""
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DPython3_EXECUTABLE={sys.executable}",
        f"-DFASTFEAT_AOT_CACHE={cache}", "-DFASTFEAT_COPY_TO_PACKAGE=OFF", f"-DFASTFEAT_AOT_JOBS={args.jobs}",
    ]  # fmt: skip
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for option, value in (("MODELS", args.models), ("DTYPES", args.dtypes), ("TARGETS", args.targets)):
        if value:
            configure.append(f"-DFASTFEAT_AOT_{option}={value.replace(',', ';')}")
    first = timed(configure)
    second = timed(["cmake", "--build", str(build_dir), "--parallel", str(args.jobs)])
    return {"wall_s": round(first["wall_s"] + second["wall_s"], 2), "cpu_s": round(first["cpu_s"] + second["cpu_s"], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the record here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="build and compile processes")
    parser.add_argument("--models", default="", help="e.g. caffenet (default: all)")
    parser.add_argument("--dtypes", default="", help="e.g. bf16 (default: all)")
    parser.add_argument("--targets", default="", help="e.g. sm90 (default: both)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fastfeat-native-build-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "aot-cache"
        cold = build(tmp / "build-cold", cache, args)
        warm = build(tmp / "build-warm", cache, args)
        no_op = timed(["cmake", "--build", str(tmp / "build-warm"), "--parallel", str(args.jobs)])
        library = next((tmp / "build-warm").rglob("libfastfeat_kernels.so"))
        record = {
            "what": "configure + build of libfastfeat_kernels.so and fastfeat-layer-bench (CMakeLists.txt)",
            "matrix": {"models": args.models or "all", "dtypes": args.dtypes or "all", "targets": args.targets or "all"},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "load_average_before": load_before,
            "jobs": args.jobs,
            "git_sha": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                      capture_output=True, text=True).stdout.strip(),
            "cold": cold,
            "clean_build_warm_cache": warm,
            "no_op": no_op,
            "library_bytes": library.stat().st_size,
            "aot_cache_bytes": du_bytes(cache),
        }  # fmt: skip
    print(json.dumps(record, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
