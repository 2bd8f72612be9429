"""RSS over a long ``fastfeat extract`` run: is memory flat however long the run?

Builds a folder of COUNT tiny JPEGs (hard links to a few hundred distinct small crops of real
photos, so it costs no disk), runs ``fastfeat extract`` on it in a subprocess, and samples the
process's RSS (VmRSS) every 0.5 s together with the rows committed so far (from the manifest).
Reports the peak RSS after the first 5,000 images and over the whole run, and img/s.

    python benchmarks/rss_probe.py --count 60000                    # this checkout
    python benchmarks/rss_probe.py --count 60000 --label before --pythonpath /path/to/old/checkout

Variants of the allocator policy can be compared in one run with ``--malloc``:
``keep`` (fastfeat's default: freed blocks kept in the heap, trimmed every few thousand images),
``keep-notrim`` (kept, never trimmed) or ``none`` (glibc's defaults).
Appends one record per run to benchmarks/results/rss_probe.json.  Never run two benchmarks at once.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "rss_probe.json")
sys.path.insert(0, HERE)
from make_corpus import source_photos  # noqa: E402


def tiny_corpus(root: str, count: int, distinct: int = 256, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in source_photos()]
    os.makedirs(os.path.join(root, "_distinct"), exist_ok=True)
    files = []
    for i in range(distinct):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        top, left = rng.integers(0, h - 96), rng.integers(0, w - 96)
        buf = io.BytesIO()
        Image.fromarray(src[top : top + 96, left : left + 96]).save(buf, "JPEG", quality=90)
        path = os.path.join(root, "_distinct", f"{i:04d}.jpg")
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        files.append(path)
    for i in range(count):
        folder = os.path.join(root, "src", f"c{i // 1000:03d}")
        os.makedirs(folder, exist_ok=True)
        os.link(files[i % distinct], os.path.join(folder, f"{i:07d}.jpg"))


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rows_done(out: str) -> int:
    try:
        with open(os.path.join(out, "manifest.json")) as f:
            return json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return 0


MALLOC_PATCH = {
    "keep": "",
    # fastfeat's heap policy without the periodic trim (the policy before the trim was added)
    "keep-notrim": "import fastfeat.forward as f; f.release_freed_memory = lambda: None; ",
    "none": "import fastfeat.runtime as r, fastfeat.extractor as e; r.keep_freed_memory = e.keep_freed_memory = lambda: None; ",
}


def run(src: str, out: str, args) -> dict:
    code = MALLOC_PATCH[args.malloc] + "import sys; from fastfeat.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "extract", src, "--out", out, "--model", args.model, "--weights", "random:0",
           "--layers", args.layers, "--batch-size", str(args.batch_size), "--shard-size", "1000", "--no-progress"]  # fmt: skip
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    samples = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=tempfile.gettempdir(), stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        rss = rss_mb(proc.pid)
        if rss is not None:
            samples.append((round(time.perf_counter() - t0, 2), round(rss, 1), rows_done(out)))
        time.sleep(0.5)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"extract failed ({proc.returncode}):\n{err[-2000:]}")
    wall = time.perf_counter() - t0
    after_5k = [rss for _, rss, rows in samples if rows <= 5000]
    peak_5k, peak = max(after_5k or [0]), max(s[1] for s in samples)
    return {
        "label": args.label,
        "malloc": args.malloc,
        "count": args.count,
        "model": args.model,
        "layers": args.layers,
        "batch_size": args.batch_size,
        "wall_s": round(wall, 1),
        "images_per_s": round(args.count / wall, 1),
        "peak_rss_first_5000_mb": round(peak_5k, 1),
        "peak_rss_mb": round(peak, 1),
        "growth": round(peak / peak_5k - 1, 3) if peak_5k else None,
        "samples_t_rss_rows": samples[:: max(1, len(samples) // 400)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=60_000)
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--layers", default="relu7")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--malloc", choices=sorted(MALLOC_PATCH), default="keep")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--pythonpath", default=None, help="import fastfeat from this checkout instead")
    ap.add_argument("--corpus", default=None, help="reuse a folder made by an earlier run (its src/ is listed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.corpus or os.path.join(tmp, "corpus")
        if not os.path.isdir(os.path.join(root, "src")):
            tiny_corpus(root, args.count)
        record = run(os.path.join(root, "src"), os.path.join(tmp, "out"), args)
    record["machine"] = _cpu_model()
    record["python"] = platform.python_version()
    record["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    records = json.load(open(RESULTS)) if os.path.isfile(RESULTS) else []
    records.append(record)
    with open(RESULTS, "w") as f:
        json.dump(records, f, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k != "samples_t_rss_rows"}))


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
