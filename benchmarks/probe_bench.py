"""How long ``fastfeat probe`` takes, by size: rows × dims × classes -> seconds, both engines, one run.

Features are synthetic but shaped like raw relu7 rows where it matters to the solvers: a
class-clustered mixture (one random centre per class plus noise) through a ReLU, scaled to a mean
squared norm of ~1e7 (what random-weight CaffeNet relu7 rows have; the issue's 210 s probe), written
as Parquet shards by fastfeat's own writer.  Each size runs the probe's default protocol (C auto on
held-out rows, logreg and svm, ``--splits`` splits) with ``--engine sklearn`` and ``--engine torch``
(CPU) in the same process, one after the other, and records seconds, mean per-class accuracy and the
fits that did not converge.

    flock /tmp/bench.lock python benchmarks/probe_bench.py --sizes 210x4096x7,1020x4096x51 --train-per-class 4,10

Writes benchmarks/results/probe_bench_cpu.json (long format: one row per size × classifier × engine).
On a shared machine the seconds are comparable only within one run (the file records the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from data_loading import cpu_model  # noqa: E402
from results import git_sha  # noqa: E402

from fastfeat.output import OutputDir, ShardTransaction, plan_items  # noqa: E402
from fastfeat.probe import run_probe  # noqa: E402
from fastfeat.sinks import get_sink  # noqa: E402
from fastfeat.sinks.base import Layout, Rows  # noqa: E402
from fastfeat.sources import Item  # noqa: E402

TARGET_MEAN_SQUARE_NORM = 1.2e7  # the raw relu7 rows
WRITE_BATCH = 256


def make_output(out: str, rows: int, dim: int, classes: int, seed: int = 0) -> float:
    """Class-clustered relu-like rows through the real writer; returns their mean squared norm."""
    layout = Layout({"relu7": dim}, "float32", {"layers": {"relu7": [dim]}, "dtype": "float32", "benchmark": True})
    config = {"format": "parquet", "layers": ["relu7"], "shard_size": rows, "metadata": layout.metadata}
    items = [Item(f"img{i:07d}", f"img{i:07d}", f"class{i % classes:03d}") for i in range(rows)]
    output = OutputDir(out, config)
    ordered, generation = plan_items(output, items, append=False)
    output.create(generation)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    codes = np.array([int(it.label[5:]) for it in ordered])
    x = np.maximum(0.5 * centres[codes] + rng.standard_normal((rows, dim), np.float32) + 0.3, 0)
    x *= np.sqrt(TARGET_MEAN_SQUARE_NORM / np.mean((x.astype(np.float64) ** 2).sum(1)))
    sink = get_sink("parquet")(layout)
    shard = ShardTransaction(output, sink, 0, 0, rows)
    for i in range(0, rows, WRITE_BATCH):
        batch = ordered[i : i + WRITE_BATCH]
        n = len(batch)
        shard.add(Rows([it.id for it in batch], [it.label for it in batch], [(256, 256)] * n, {"relu7": x[i : i + n]}))
    shard.close()
    output.finish()
    return float(np.mean((x.astype(np.float64) ** 2).sum(1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="210x4096x7,1020x4096x51", help="ROWSxDIMSxCLASSES, comma-separated")
    ap.add_argument("--train-per-class", default="4,10", help="one per size")
    ap.add_argument("--splits", type=int, default=2)
    ap.add_argument("--classifiers", default="logreg,svm")
    ap.add_argument("--engines", default="sklearn,torch")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    trains = [int(v) for v in args.train_per_class.split(",")]
    if len(trains) != len(sizes):
        ap.error("--train-per-class needs one value per size")
    load_before = os.getloadavg()[0]
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="fastfeat-probe-bench-") as work:
        for (rows, dim, classes), train in zip(sizes, trains, strict=True):
            out = os.path.join(work, f"{rows}x{dim}x{classes}")
            norm = make_output(out, rows, dim, classes)
            for classifier in args.classifiers.split(","):
                for engine in args.engines.split(","):
                    t0 = time.perf_counter()
                    r = run_probe(out, "relu7", train_per_class=train, splits=args.splits, classifier=classifier,
                                  engine=engine, device="cpu")  # fmt: skip
                    seconds = time.perf_counter() - t0
                    row = {
                        "rows": rows, "dims": dim, "classes": classes, "train_per_class": train,
                        "splits": args.splits, "classifier": classifier, "engine": engine, "C": "auto",
                        "seconds": round(seconds, 2), "seconds_per_split": round(seconds / args.splits, 2),
                        "mean_class_accuracy": round(r["mean_class_accuracy"]["mean"], 4),
                        "per_split": [round(s["mean_class_accuracy"], 4) for s in r["per_split"]],
                        "C_per_split": [s["C"] for s in r["per_split"]],
                        "not_converged_fits": r["not_converged_fits"], "mean_square_norm": round(norm),
                    }  # fmt: skip
                    rows_out.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    result = {
        "what": "fastfeat probe wall time by rows x dims x classes, sklearn and torch engines (CPU), same run",
        "machine": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "note": "shared machine under load from other jobs: compare seconds only within this file",
        "git_sha": git_sha(),
        "rows": rows_out,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "probe_bench_cpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
