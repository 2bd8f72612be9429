"""End-to-end cost of test-time augmentation (``extract --augment``), in one run: img/s and views/s of
``fastfeat extract`` per mode, and of the decode stage alone (reader + DALI, the views cropped from one
decode and one resize), on the same corpus as benchmarks/e2e.py.

    python benchmarks/e2e_augment.py --count 320 --repeats 3

The forward pass grows with the number of views; the decode should not (one decode and one resize
per image whatever the views), which the decode-only rows show.  Writes
benchmarks/results/e2e_augment_cpu.json and appends to results.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from data_loading import cpu_model  # noqa: E402
from make_corpus import make_corpus  # noqa: E402
from results import append, percentiles  # noqa: E402

import fastfeat  # noqa: E402
from fastfeat.augment import get_views  # noqa: E402
from fastfeat.decode import Decoder, read_image  # noqa: E402
from fastfeat.models import get_model  # noqa: E402
from fastfeat.runtime import default_precision  # noqa: E402
from fastfeat.sources import list_items  # noqa: E402

MODEL, WEIGHTS, LAYERS = "alexnet", "random:0", ["relu6", "relu7"]
MODES = ("center", "center+flip", "5crop", "10crop")


def extract_run(corpus: str, batch_size: int, augment: str) -> float:
    out = tempfile.mkdtemp(prefix="fastfeat-bench-")
    try:
        s = fastfeat.extract(corpus, out, model=MODEL, weights=WEIGHTS, layers=LAYERS, batch_size=batch_size,
                             augment=augment, progress=False)  # fmt: skip
        return s["images_per_s"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def decode_run(items, batch_size: int, augment: str) -> float:
    dec = Decoder(get_model(MODEL).preprocess, batch_size, torch.device("cpu"), views=get_views(augment))
    t0 = time.perf_counter()
    for i in range(0, len(items), batch_size):
        read = [read_image(it, 10**9) for it in items[i : i + batch_size]]
        dec.decode([r[0] for r in read], [r[1] for r in read])
    return len(items) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=None, help="existing corpus folder (default: generate one in a temp dir)")
    ap.add_argument("--count", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    corpus = args.corpus or tempfile.mkdtemp(prefix="fastfeat-corpus-")
    corpus_stats = make_corpus(corpus, args.count) if not args.corpus else None
    items = list_items(corpus)
    runs = {}
    for mode in MODES:
        runs[f"fastfeat extract --augment {mode}"] = (mode, lambda m=mode: extract_run(corpus, args.batch_size, m))
        runs[f"decode only --augment {mode}"] = (mode, lambda m=mode: decode_run(items, args.batch_size, m))
    extract_run(corpus, args.batch_size, "center")  # warm-up: DALI/oneDNN initialisation, page cache
    load_before = round(os.getloadavg()[0], 2)
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.repeats):
        for name, (_, fn) in runs.items():
            samples[name].append(fn())
            print(f"rep {rep} {name}: {samples[name][-1]:.1f} img/s", file=sys.stderr)
    precision = default_precision(torch.device("cpu"))
    machine = cpu_model()
    summary = {}
    for name, (mode, _) in runs.items():
        p20, p50, p80 = percentiles(samples[name])
        views = len(get_views(mode))
        summary[name] = {"views": views, "img_per_s": {"p20": round(p20, 1), "p50": round(p50, 1), "p80": round(p80, 1)},
                         "views_per_s_p50": round(p50 * views, 1)}  # fmt: skip
    base = summary["fastfeat extract --augment center"]["img_per_s"]["p50"]
    for mode in MODES:
        row = summary[f"fastfeat extract --augment {mode}"]
        row["time_per_image_vs_center"] = round(base / row["img_per_s"]["p50"], 2)
    result = {
        "benchmark": f"extract --augment cost, {MODEL} relu6+relu7, batch {args.batch_size} images, {precision}",
        "machine": {
            "lscpu_model": machine,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },  # fmt: skip
        "corpus": corpus_stats or {"path": corpus, "count": len(items)},
        "repeats": args.repeats,
        # Other processes on the machine meanwhile (1-min load average before / after): a busy machine is
        # slower for every reader alike (they run interleaved), but noisier.
        "load_average": [load_before, round(os.getloadavg()[0], 2)],
        "results": summary,
    }
    print(json.dumps(result, indent=1))
    with open(os.path.join(os.path.dirname(__file__), "results", "e2e_augment_cpu.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    append(
        [
            {
                "kernel": "extract_e2e_augment",
                "provider": name,
                "shape": f"{MODEL} 224, {v['views']} views",
                "dtype": precision,
                "batch": args.batch_size,
                "metric": "img/s",
                **v["img_per_s"],
                "device": f"{machine}, {os.cpu_count()} threads",
            }  # fmt: skip
            for name, v in summary.items()
        ]
    )
    if not args.corpus:
        shutil.rmtree(corpus, ignore_errors=True)


if __name__ == "__main__":
    main()
