"""A/B of ``fastfeat extract`` itself: two or more code versions on the same corpus, interleaved, same run.

Each variant is a checkout to import fastfeat from (``PYTHONPATH``; empty for this one) and optional
Python run before the CLI (to switch a policy off, say).  The variants run in turn, ``--repeats``
times, each into a fresh output directory; the figure is img/s over the run's own wall time from
its summary (start-up excluded, as the old and new summaries both report it); the process's wall
time (start-up included) is kept too.

    python benchmarks/ab_extract.py --corpus corpus --variant before=/path/to/old/checkout --variant after=
    python benchmarks/ab_extract.py --corpus corpus --variant trim= \\
        --variant "notrim=:import fastfeat.forward as f; f.release_freed_memory = lambda: None"

Each variant's first output is compared with the first variant's: the feature columns value for value
(``features_identical``) and the part files byte for byte (``part_bytes_identical``); where only the
bytes differ, ``metadata_keys_differing`` names the run-metadata keys (in the Parquet schema) that do.

Writes benchmarks/results/ab_extract.json (appends a record).  Never run two benchmarks at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "ab_extract.json")
sys.path.insert(0, HERE)
from rss_probe import _cpu_model  # noqa: E402


def run_once(corpus: str, out: str, pythonpath: str, prelude: str, extra: list[str]) -> dict:
    code = (
        prelude + ("; " if prelude else "") + "import sys; from fastfeat.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    cmd = [sys.executable, "-c", code, "extract", corpus, "--out", out, "--no-progress", "--json", *extra]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout)
    return {"img_per_s": summary["images_per_s"], "process_wall_s": round(wall, 2)}


def output_digests(out: str) -> dict:
    """Hashes of one extract output: every part file's bytes, and its feature columns' values in row order."""
    import glob
    import hashlib

    import pyarrow.parquet as pq

    parts = sorted(glob.glob(os.path.join(out, "**", "part-*"), recursive=True))
    if not parts:
        raise SystemExit(f"no part files under {out}")
    file_bytes, features = hashlib.sha256(), hashlib.sha256()
    metadata: dict = {}
    for part in parts:
        with open(part, "rb") as f:
            file_bytes.update(f.read())
        if part.endswith(".parquet"):
            table = pq.read_table(part)
            metadata = json.loads((table.schema.metadata or {}).get(b"fastfeat", b"{}"))
            for name in sorted(table.column_names):
                features.update(name.encode())
                features.update(repr(table.column(name).to_pylist()).encode())
    return {"parts": len(parts), "part_bytes": file_bytes.hexdigest(), "features": features.hexdigest(),
            "metadata": metadata}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--variant", action="append", required=True, help="LABEL=PYTHONPATH[:PRELUDE]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--args", default="--model alexnet --weights random:0 --layers relu6,relu7 --batch-size 64")
    args = ap.parse_args()
    variants = []
    for v in args.variant:
        label, _, rest = v.partition("=")
        path, _, prelude = rest.partition(":")
        variants.append((label, path, prelude))
    samples: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    digests: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for label, path, prelude in variants:
                out = os.path.join(tmp, f"{label}-{rep}")
                r = run_once(args.corpus, out, path, prelude, args.args.split())
                samples[label].append(r["img_per_s"])
                if rep == 0:
                    digests[label] = output_digests(out)
                print(f"rep {rep} {label}: {r['img_per_s']:.1f} img/s", file=sys.stderr)
    stats = {k: dict(zip(("p20", "p50", "p80"), np.percentile(v, [20, 50, 80]).round(2).tolist(), strict=True))
             for k, v in samples.items()}  # fmt: skip
    first = variants[0][0]
    record = {
        "what": "fastfeat extract img/s (summary, start-up excluded), interleaved variants",
        "args": args.args,
        "corpus": {"path": args.corpus, "files": sum(len(f) for _, _, f in os.walk(args.corpus))},
        "repeats": args.repeats,
        "variants": {label: {"pythonpath": p or "(this checkout)", "prelude": pre} for label, p, pre in variants},
        "img_per_s": stats,
        "samples": samples,
        f"ratio_vs_{first}_p50": {k: round(v["p50"] / stats[first]["p50"], 3) for k, v in stats.items()},
        f"outputs_vs_{first}": {
            label: {
                "features_identical": d["features"] == digests[first]["features"],
                "part_bytes_identical": d["part_bytes"] == digests[first]["part_bytes"],
                "parts": d["parts"],
                # what makes the bytes differ when the features do not: run metadata keys added or changed
                "metadata_keys_differing": sorted(
                    k
                    for k in set(d["metadata"]) | set(digests[first]["metadata"])
                    if d["metadata"].get(k) != digests[first]["metadata"].get(k)
                ),
            }
            for label, d in digests.items()
        },
        "machine": _cpu_model(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    records = json.load(open(RESULTS)) if os.path.isfile(RESULTS) else []
    records.append(record)
    with open(RESULTS, "w") as f:
        json.dump(records, f, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
