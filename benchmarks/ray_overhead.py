"""What ``fastfeat extract --ray`` costs against a plain run, same corpus, same run, interleaved.

(a) plain single-process ``fastfeat extract`` against ``--ray`` with one worker holding all the cores:
    the ratio of their img/s is Ray's overhead (target: at most 10%).
(b) ``--ray`` with two CPU workers of one core each against one process with two cores (``--threads 2``).

Every variant is a fresh ``fastfeat extract`` process into a fresh output directory; ``--ray`` starts
its own local Ray instance, as a user's first command would.  Two figures per run: img/s over the
run's wall time from its summary (start-up excluded: listing, model load, for --ray the Ray start and
the first worker's model load) and img/s over the whole process (start-up included).  A Ray run's
per-shard scheduling cost (one task and one manifest commit per shard) is in the first figure.

    python benchmarks/ray_overhead.py --count 600 --repeats 3
    python benchmarks/ray_overhead.py --driver-costs     # only the driver's per-shard costs (below)

``--driver-costs`` measures what the driver pays per output shard at scale, for the README's
1,000,000-image estimate: a manifest commit with 100 and 1,000 shards already listed (with and without
error records), pickling one 10,000-item shard's items (what a task ships), and one round trip to a
Ray actor (a task's scheduling cost).  It writes benchmarks/results/ray_driver_costs.json.

Writes benchmarks/results/ray_overhead.json: long format, one row per (what, provider, metric) with
p20/p50/p80 over the repeats, the machine (lscpu), git sha, date and the load (uptime) before and
after.  Never run two benchmarks at once; other jobs on the machine show in the load figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "ray_overhead.json")
sys.path.insert(0, HERE)
from make_corpus import make_corpus  # noqa: E402

COMMON = ["--model", "caffenet", "--weights", "random:0", "--layers", "relu7", "--batch-size", "32"]
VARIANTS = {
    # (a): one worker with both cores against the plain run (which uses both cores)
    "plain": [],
    "ray-1x2cpu": ["--ray", "--ray-workers", "1", "--ray-cpus-per-worker", "2"],
    # (b): two one-core workers against one two-core process
    "plain-threads2": ["--threads", "2"],
    "ray-2x1cpu": ["--ray", "--ray-workers", "2", "--ray-cpus-per-worker", "1"],
}
COMPARISONS = [
    ("(a) --ray one worker vs single process", "ray-1x2cpu", "plain"),
    ("(b) --ray two 1-CPU workers vs one 2-core process", "ray-2x1cpu", "plain-threads2"),
]


def run_once(corpus: str, out: str, extra: list[str], shard_size: int) -> dict:
    cmd = [sys.executable, "-m", "fastfeat", "extract", corpus, "--out", out, "--no-progress", "--json"]
    cmd += [*COMMON, "--shard-size", str(shard_size), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    s = json.loads(proc.stdout)
    return {
        "img_per_s": s["images_per_s"],
        "img_per_s_process": round(s["processed"] / wall, 2),
        "startup_s": s["startup_s"],
        "process_s": round(wall, 2),
    }


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    get = lambda k: fields.get(k, "").strip()  # noqa: E731
    return f"{get('Model name')}, {get('CPU(s)')} CPUs, {get('Thread(s) per core')} thread(s) per core"


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def git_sha() -> str:
    proc = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip()


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def driver_costs(repeats: int = 20) -> list[dict]:
    """Milliseconds the driver spends per shard, measured on synthetic records (no model, no images)."""
    import pickle

    import ray

    from fastfeat.cluster import pack_items
    from fastfeat.output import OutputDir, ShardRecord
    from fastfeat.sources import Item

    rows = []
    work = tempfile.mkdtemp(prefix="ray_driver-")
    try:
        for listed, errors_per_shard in ((100, 0), (1000, 0), (1000, 10)):
            out = OutputDir(os.path.join(work, f"out-{listed}-{errors_per_shard}"), {"shard_size": 1000})
            out.create()
            errs = [{"id": f"class{k}/img_{k:07d}.jpg", "stage": "decode", "message": "corrupt JPEG data"}
                    for k in range(errors_per_shard)]  # fmt: skip
            for k in range(listed):
                out.shards[k] = ShardRecord(k, f"part-{k:05d}.parquet", 1000, k * 1000, (k + 1) * 1000, "0" * 64, 1 << 24, errs)  # fmt: skip
            new = ShardRecord(listed, f"part-{listed:05d}.parquet", 1000, 0, 1000, "0" * 64, 1 << 24, errs)
            samples = _timed(lambda out=out, new=new: out.commit_shard(new), repeats)
            rows.append((f"manifest commit, {listed} shards listed, {errors_per_shard} errors each", "commit_ms", samples))  # fmt: skip
        items = [Item(f"class{k % 1000}/img_{k:07d}.jpg", f"/data/imagenet/train/class{k % 1000}/img_{k:07d}.jpg", f"class{k % 1000}")
                 for k in range(10_000)]  # fmt: skip
        packed = pack_items(items)
        rows.append(("pickle one 10,000-item shard's Items", "pickle_ms", _timed(lambda: pickle.dumps(items), repeats)))
        rows.append(("pack and pickle them as columns (what a task ships)", "pickle_ms", _timed(lambda: pickle.dumps(pack_items(items)), repeats)))  # fmt: skip
        rows.append(("the columns' pickled size", "MB", [len(pickle.dumps(packed)) / 1e6]))
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")

        @ray.remote(num_cpus=0)
        class Echo:
            def call(self, x):
                return len(x)

        echo = Echo.remote()
        ray.get(echo.call.remote([]))
        rows.append(("actor round trip, empty task", "task_ms", _timed(lambda: ray.get(echo.call.remote([])), repeats)))
        rows.append(("actor round trip with one shard's Items", "task_ms", _timed(lambda: ray.get(echo.call.remote(items)), repeats)))  # fmt: skip
        rows.append(("actor round trip with one shard's columns", "task_ms", _timed(lambda: ray.get(echo.call.remote(pack_items(items))), repeats)))  # fmt: skip
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common = {"machine": machine(), "load": load(), "git_sha": git_sha(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip
    out_rows = []
    for what, metric, samples in rows:
        p20, p50, p80 = (round(float(v), 3) for v in np.percentile(samples, [20, 50, 80]))
        out_rows.append({"what": what, "provider": "fastfeat driver", "metric": metric, "p20": p20, "p50": p50,
                         "p80": p80, **common})  # fmt: skip
    return out_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--driver-costs", action="store_true", help="only the driver's per-shard costs")
    ap.add_argument("--count", type=int, default=600, help="JPEGs in the corpus (make_corpus.py)")
    ap.add_argument("--corpus", default=None, help="an existing corpus folder instead")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=100, help="shards of this many images: tasks for Ray")
    args = ap.parse_args()
    if args.driver_costs:
        rows = driver_costs()
        with open(os.path.join(HERE, "results", "ray_driver_costs.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
        for row in rows:
            print(f"{row['what']:<58} {row['metric']:<10} p50 {row['p50']}")
        return
    work = tempfile.mkdtemp(prefix="ray_overhead-")
    try:
        corpus = args.corpus or os.path.join(work, "corpus")
        if args.corpus is None:
            make_corpus(corpus, args.count)
        files = sum(len(f) for _, _, f in os.walk(corpus))
        load_before = load()
        samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            for name, extra in VARIANTS.items():  # interleaved: a slow spell of the machine hits every variant
                out = os.path.join(work, f"{name}-{r}")
                samples[name].append(run_once(corpus, out, extra, args.shard_size))
                shutil.rmtree(out)
                print(name, r, samples[name][-1], file=sys.stderr, flush=True)
        load_after = load()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common = {
        "corpus": {"files": files, "generator": "benchmarks/make_corpus.py" if args.corpus is None else args.corpus},
        "args": " ".join([*COMMON, "--shard-size", str(args.shard_size)]),
        "repeats": args.repeats,
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_after,
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    rows = []
    for name, extra in VARIANTS.items():
        for metric in ("img_per_s", "img_per_s_process", "startup_s"):
            values = [s[metric] for s in samples[name]]
            p20, p50, p80 = (round(float(v), 3) for v in np.percentile(values, [20, 50, 80]))
            rows.append({"what": "fastfeat extract " + " ".join(extra), "provider": name, "metric": metric,
                         "p20": p20, "p50": p50, "p80": p80, "samples": values, **common})  # fmt: skip
    for what, ray_v, plain_v in COMPARISONS:
        for metric in ("img_per_s", "img_per_s_process"):
            ratios = [a[metric] / b[metric] for a, b in zip(samples[ray_v], samples[plain_v], strict=True)]
            p20, p50, p80 = (round(float(v), 3) for v in np.percentile(ratios, [20, 50, 80]))
            rows.append({"what": what, "provider": f"{ray_v}/{plain_v}", "metric": f"{metric} ratio (same repeat)",
                         "p20": p20, "p50": p50, "p80": p80, "samples": [round(x, 3) for x in ratios], **common})  # fmt: skip
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    for row in rows:
        print(f"{row['provider']:<28} {row['metric']:<34} p50 {row['p50']}")


if __name__ == "__main__":
    main()
