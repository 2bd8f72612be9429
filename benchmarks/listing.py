"""Folder listing: the previous ``os.walk`` listing against ``fastfeat.sources.list_items``, in one run.

Creates a tree of zero-byte ``.jpg`` files spread over ``--folders`` first-level folders in a
temporary directory, then lists it with both implementations, each in its own fresh process:

* time: wall seconds of the listing (warm dentry cache: one untimed listing first, then the two
  implementations interleaved, ``--repeats`` times each; min and median reported), and the
  resident-memory growth over the listing (RSS after minus before, /proc/self/statm);
* memory: tracemalloc's retained (after the listing, what the item list holds) and peak MB
  (a separate run: tracemalloc slows Python down);
* the time of one pass over all items building the extractor's ids/labels hash (for the new list
  also from its ``ids()``/``labels()`` columns, without making Item objects);
* a sha256 over every item's ``id\\tlabel\\tpath`` (both must agree).

    python benchmarks/listing.py --files 1000000 --folders 100

Writes benchmarks/results/listing.json.  Never run two benchmarks at once on a 2-core machine.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# ---------------------------------------------------------------------------------------------
# The listing as it was before (fastfeat/sources.py at git ffb3cd6), kept for the comparison.

OLD_IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pnm", ".ppm", ".pgm", ".jp2", ".gif"}
)


@dataclass(frozen=True)
class OldItem:
    id: str
    path: str
    label: str | None
    offset: int | None = None
    size: int | None = None
    error: str | None = None


def old_walk_folder(root: str) -> list[OldItem]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fname in filenames:
            if fname.startswith(".") or os.path.splitext(fname)[1].lower() not in OLD_IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, fname)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            parts = rel.split("/")
            items.append(OldItem(rel, os.path.abspath(path), parts[0] if len(parts) > 1 else None))
    items.sort(key=lambda it: it.id.encode("utf-8"))
    return items


def old_list_items(source: str) -> list[OldItem]:
    """The folder branch of the old ``list_items``: walk, then the emptiness and duplicate-id checks."""
    items = old_walk_folder(source)
    if not items:
        raise ValueError(f"source has no images: {source}")
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise ValueError(f"duplicate id {it.id!r}")
        seen.add(it.id)
    return items


def new_list_items(source: str):
    from fastfeat.sources import list_items

    return list_items(source)


IMPLS = {"old": old_list_items, "new": new_list_items}

# ---------------------------------------------------------------------------------------------
# Worker: one implementation, one measurement, in a fresh process


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(impl: str, root: str, mode: str) -> dict:
    fn = IMPLS[impl]
    if impl == "new":
        import fastfeat.sources  # noqa: F401  (import time is not listing time)
    gc.collect()
    if mode == "mem":
        import tracemalloc

        tracemalloc.start()
        items = fn(root)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {"items": len(items), "retained_mb": current / 1e6, "peak_mb": peak / 1e6}
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    items = fn(root)
    seconds = time.perf_counter() - t0
    rss1 = _rss_bytes()
    t0 = time.perf_counter()  # what the extractor does with every item once: the run's ids/labels hash
    hashlib.sha256("\n".join(f"{it.id}\t{it.label}" for it in items).encode()).hexdigest()
    hash_seconds = time.perf_counter() - t0
    fast_hash_seconds = None
    if hasattr(items, "ids"):  # the ItemList column iterators: what the extractor can use instead
        t0 = time.perf_counter()
        pairs = zip(items.ids(), items.labels(), strict=True)
        hashlib.sha256("\n".join(f"{i}\t{label}" for i, label in pairs).encode()).hexdigest()
        fast_hash_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    digest = hashlib.sha256()
    for it in items:
        digest.update(f"{it.id}\t{it.label}\t{it.path}\n".encode("utf-8", "surrogateescape"))
    return {
        "items": len(items),
        "seconds": seconds,
        "rss_delta_mb": (rss1 - rss0) / 1e6,
        "ids_labels_hash_seconds": hash_seconds,
        "ids_labels_hash_columns_seconds": fast_hash_seconds,
        "sha256": digest.hexdigest(),
    }


def run_worker(impl: str, root: str, mode: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--root", root, "--mode", mode]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Driver


def make_tree(root: str, files: int, folders: int) -> float:
    t0 = time.perf_counter()
    per = -(-files // folders)
    for k in range(folders):
        sub = os.path.join(root, f"class_{k:03d}")
        os.mkdir(sub)
        for i in range(k * per, min((k + 1) * per, files)):
            os.close(os.open(os.path.join(sub, f"img_{i:07d}.jpg"), os.O_CREAT | os.O_WRONLY, 0o644))
    return time.perf_counter() - t0


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--folders", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "listing.json"))
    ap.add_argument("--worker", choices=sorted(IMPLS))
    ap.add_argument("--root")
    ap.add_argument("--mode", choices=["time", "mem"], default="time")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.root, args.mode)))
        return

    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="fastfeat-listing-")
    try:
        root = os.path.join(tmp, "tree")
        os.mkdir(root)
        print(f"creating {args.files:,} files in {args.folders} folders under {root} ...", file=sys.stderr)
        create_s = make_tree(root, args.files, args.folders)
        print(f"created in {create_s:.1f} s", file=sys.stderr)
        run_worker("new", root, "time")  # warm the dentry/inode caches; not counted
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for rep in range(args.repeats):
            for impl in ("old", "new"):
                r = run_worker(impl, root, "time")
                runs[impl].append(r)
                print(f"rep {rep} {impl}: {r['seconds']:.2f} s, RSS +{r['rss_delta_mb']:.0f} MB", file=sys.stderr)
        mem = {impl: run_worker(impl, root, "mem") for impl in ("old", "new")}
        for impl, m in mem.items():
            print(f"{impl}: retained {m['retained_mb']:.1f} MB, peak {m['peak_mb']:.1f} MB", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    shas = {r["sha256"] for rs in runs.values() for r in rs}
    counts = {r["items"] for rs in runs.values() for r in rs}
    if len(shas) != 1 or counts != {args.files}:
        raise SystemExit(f"the implementations disagree: {counts} items, {len(shas)} different digests")

    def summary(impl: str) -> dict:
        rs = runs[impl]
        secs = [r["seconds"] for r in rs]
        return {
            "seconds_min": round(min(secs), 3),
            "seconds_median": round(statistics.median(secs), 3),
            "seconds_all": [round(s, 3) for s in secs],
            "rss_delta_mb_median": round(statistics.median(r["rss_delta_mb"] for r in rs), 1),
            "tracemalloc_retained_mb": round(mem[impl]["retained_mb"], 1),
            "tracemalloc_peak_mb": round(mem[impl]["peak_mb"], 1),
            "ids_labels_hash_seconds_median": round(statistics.median(r["ids_labels_hash_seconds"] for r in rs), 3),
        } | (
            {
                "ids_labels_hash_from_columns_seconds_median": round(
                    statistics.median(r["ids_labels_hash_columns_seconds"] for r in rs), 3
                )
            }
            if rs[0]["ids_labels_hash_columns_seconds"] is not None
            else {}
        )

    old, new = summary("old"), summary("new")
    result = {
        "benchmark": "folder listing: previous os.walk list_items vs fastfeat.sources.list_items (warm cache)",
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "tree": {"files": args.files, "folders": args.folders, "file_bytes": 0, "create_seconds": round(create_s, 1)},
        "repeats": args.repeats,
        "same_items": True,
        "old": old,
        "new": new,
        "speedup_median": round(old["seconds_median"] / new["seconds_median"], 2),
        "retained_memory_ratio": round(old["tracemalloc_retained_mb"] / new["tracemalloc_retained_mb"], 1),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
