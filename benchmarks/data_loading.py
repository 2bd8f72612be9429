"""Reading features for training: ``fastfeat.data`` against the obvious alternatives, in one run.

All read the same Parquet shards (relu7, 4096-d float16, 10,000 rows per shard, zstd) and deliver the
same thing, a float16 [batch, 4096] tensor and an int64 label tensor per batch of 1,024 rows:

* fastfeat.data             : FeatureDataset, in order / shuffled (shuffle buffer 8,192 rows) /
                              under a DataLoader with 2 worker processes;
* pyarrow.dataset (obvious) : ``ds.dataset(files).to_batches(...)``, then
                              ``torch.from_numpy(np.stack(column.to_numpy(zero_copy_only=False)))``
                              and labels through a dict, as one writes it the first time;
* pyarrow.dataset (flatten) : the same batches, with the fixed-size-list column flattened into one
                              array (what fastfeat.data does inside): the floor of the Arrow read;
* HF datasets (streaming)   : ``load_dataset("parquet", data_files=..., streaming=True)``
                              ``.with_format("torch").iter(batch_size=1024)``.

The shards are written by fastfeat's own exactly-once writer (``fastfeat.output`` + the Parquet sink),
with synthetic relu-like rows (max(N(0,1), 0), half zeros, as relu7 is) so that 40,000 rows take
seconds to make instead of hours of extraction; the bytes on disk are what a real run writes.
After one warm-up pass of each (page cache), the readers run interleaved ``--repeats`` times.

    python benchmarks/data_loading.py --rows 40000 --repeats 3

Writes benchmarks/results/data_loading_cpu.json and appends to results.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch

sys.path.insert(0, os.path.dirname(__file__))
from results import append, percentiles  # noqa: E402

from fastfeat.data import FeatureDataset, class_index, parquet_files  # noqa: E402
from fastfeat.output import OutputDir, ShardTransaction, plan_items  # noqa: E402
from fastfeat.sinks import get_sink  # noqa: E402
from fastfeat.sinks.base import Layout, Rows  # noqa: E402
from fastfeat.sources import Item  # noqa: E402

DIM, BATCH, SHARD, CLASSES, WRITE_BATCH = 4096, 1024, 10_000, 100, 64


def make_shards(out: str, rows: int, seed: int = 0) -> None:
    """``rows`` rows through the real writer: OutputDir, ShardTransaction, the Parquet sink."""
    layout = Layout({"relu7": DIM}, "float16", {"layers": {"relu7": [DIM]}, "dtype": "float16", "benchmark": True})
    config = {"format": "parquet", "layers": ["relu7"], "shard_size": SHARD, "metadata": layout.metadata}
    items = [Item(f"img{i:07d}", f"img{i:07d}", f"class{i % CLASSES:03d}") for i in range(rows)]
    output = OutputDir(out, config)
    ordered, generation = plan_items(output, items, append=False)
    output.create(generation)
    sink = get_sink("parquet")(layout)
    rng = np.random.default_rng(seed)
    for index, first in enumerate(range(0, rows, SHARD)):
        end = min(first + SHARD, rows)
        shard = ShardTransaction(output, sink, index, first, end)
        for i in range(first, end, WRITE_BATCH):  # the extractor hands the writer batches of this size
            j = min(i + WRITE_BATCH, end)
            x = np.maximum(rng.standard_normal((j - i, DIM), np.float32), 0).astype(np.float16)
            batch = ordered[i:j]
            shard.add(Rows([it.id for it in batch], [it.label for it in batch], [(256, 256)] * (j - i), {"relu7": x}))
        shard.close()
    output.finish()


def read_fastfeat(out, **kw):
    for b in FeatureDataset(out, "relu7", batch_size=BATCH, **kw):
        yield b["relu7"], b["label"]


def read_fastfeat_workers(out):
    ds = FeatureDataset(out, "relu7", batch_size=BATCH)
    for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2):
        yield b["relu7"], b["label"]


def read_pyarrow_obvious(out):
    index = {c: i for i, c in enumerate(class_index(out))}
    for b in ds.dataset(parquet_files(out)).to_batches(columns=["relu7", "label"], batch_size=BATCH):
        x = torch.from_numpy(np.stack(b.column("relu7").to_numpy(zero_copy_only=False)))
        y = torch.tensor([index[lab] for lab in b.column("label").to_pylist()])
        yield x, y


def read_pyarrow_flatten(out):
    classes = pa.array(class_index(out))
    for b in ds.dataset(parquet_files(out)).to_batches(columns=["relu7", "label"], batch_size=BATCH):
        x = torch.from_numpy(b.column("relu7").flatten().to_numpy().reshape(-1, DIM).copy())
        y = torch.from_numpy(pc.index_in(b.column("label"), value_set=classes).to_numpy().astype(np.int64))
        yield x, y


def read_hf_streaming(out):
    from datasets import load_dataset

    index = {c: i for i, c in enumerate(class_index(out))}
    stream = load_dataset("parquet", data_files=parquet_files(out), split="train", streaming=True)
    for b in stream.select_columns(["relu7", "label"]).with_format("torch").iter(batch_size=BATCH):
        x = b["relu7"]
        y = torch.tensor([index[lab] for lab in b["label"]])  # labels stay strings in torch format
        yield x, y


READERS = {
    "fastfeat.data": lambda out: read_fastfeat(out),
    "fastfeat.data (shuffled)": lambda out: read_fastfeat(out, shuffle=True, seed=0),
    "fastfeat.data (DataLoader, 2 workers)": read_fastfeat_workers,
    "pyarrow.dataset + torch.from_numpy (obvious)": read_pyarrow_obvious,
    "pyarrow.dataset + flatten (by hand)": read_pyarrow_flatten,
    "HF datasets (streaming, torch format)": read_hf_streaming,
}


def one_pass(reader, out) -> tuple[float, int, float, str]:
    """(seconds, rows, checksum of the features, feature dtype) of one full pass."""
    t0 = time.perf_counter()
    rows, total, dtype = 0, 0.0, ""
    for x, y in reader(out):
        rows += len(y)
        total += float(x[:, :8].float().sum())  # touches every batch; cheap next to the read
        dtype = str(x.dtype)
    return time.perf_counter() - t0, rows, total, dtype


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", default=None, help="write the shards here and keep them (default: a temp dir)")
    ap.add_argument("--no-save", action="store_true", help="print only (a smoke run): no JSON, no CSV rows")
    args = ap.parse_args()
    out = args.keep or os.path.join(tempfile.mkdtemp(prefix="fastfeat-data-bench-"), "out")
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        make_shards(out, args.rows)
    disk = sum(os.path.getsize(f) for f in parquet_files(out))
    payload = args.rows * DIM * 2  # float16 features delivered per pass
    checks = {}
    for name, reader in READERS.items():  # warm-up: page cache, imports; and every reader sees the same rows
        _, rows, check, dtype = one_pass(reader, out)
        checks[name] = (rows, round(check, 1), dtype)
        print(f"warm-up {name}: {rows} rows, checksum {check:.1f}, {dtype}", file=sys.stderr)
    rows_seen = {c[0] for c in checks.values()}
    if rows_seen != {args.rows}:
        raise SystemExit(f"readers disagree on the rows: {checks}")
    load_before = round(os.getloadavg()[0], 2)
    samples: dict[str, list[float]] = {k: [] for k in READERS}
    for rep in range(args.repeats):
        for name, reader in READERS.items():
            seconds = one_pass(reader, out)[0]
            samples[name].append(args.rows / seconds)
            print(f"rep {rep} {name}: {samples[name][-1]:,.0f} rows/s", file=sys.stderr)
    machine = cpu_model()
    device = f"{machine}, {os.cpu_count()} threads"
    summary = {}
    for name, v in samples.items():
        p20, p50, p80 = percentiles(v)
        summary[name] = {
            "rows_per_s": {"p20": round(p20), "p50": round(p50), "p80": round(p80)},
            "MB_per_s": {
                k: round(r * DIM * 2 / 1e6, 1) for k, r in zip(("p20", "p50", "p80"), (p20, p50, p80), strict=True)
            },
            "feature_dtype": checks[name][2],
            "checksum": checks[name][1],
        }
    base = summary["pyarrow.dataset + torch.from_numpy (obvious)"]["rows_per_s"]["p50"]
    result = {
        "benchmark": "reading relu7 shards for training: rows/s and MB/s of float16 features delivered as torch tensors",
        "machine": {
            "lscpu_model": machine,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "pyarrow": pa.__version__,
            "datasets": __import__("datasets").__version__,
        },  # fmt: skip
        "data": {
            "rows": args.rows,
            "dim": DIM,
            "dtype": "float16",
            "shard_rows": SHARD,
            "batch": BATCH,
            "payload_MB": round(payload / 1e6, 1),
            "on_disk_MB": round(disk / 1e6, 1),
            "rows_are": "synthetic max(N(0,1), 0) float16, written by fastfeat's Parquet sink",
        },  # fmt: skip
        "repeats": args.repeats,
        # Other processes on the machine meanwhile (1-min load average before / after): a busy machine is
        # slower for every reader alike (they run interleaved), but noisier.
        "load_average": [load_before, round(os.getloadavg()[0], 2)],
        "readers": summary,
        "speedup_vs_obvious_p50": {k: round(v["rows_per_s"]["p50"] / base, 2) for k, v in summary.items()},
    }
    print(json.dumps(result, indent=1))
    if args.no_save:
        return
    with open(os.path.join(os.path.dirname(__file__), "results", "data_loading_cpu.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    append(
        [
            {
                "kernel": "data_loading",
                "provider": name,
                "shape": f"{args.rows}x{DIM}",
                "dtype": "float16",
                "batch": BATCH,
                "metric": metric,
                "p20": v[key]["p20"],
                "p50": v[key]["p50"],
                "p80": v[key]["p80"],
                "device": device,
            }  # fmt: skip
            for name, v in summary.items()
            for metric, key in (("rows/s", "rows_per_s"), ("MB/s", "MB_per_s"))
        ]
    )
    if not args.keep:
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)


if __name__ == "__main__":
    main()
