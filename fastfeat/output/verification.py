"""``fastfeat verify``: an output directory checked against its manifest."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile

import pyarrow.parquet as pq

from .. import storage
from ..checksum import file_sha256
from ..sinks import DEFAULT_FORMAT, get_sink
from ..sinks.base import Layout, Sink
from .generations import shard_tasks
from .layout import ERRORS, MANIFEST, SHARD_RE, OutputError
from .manifest import ShardRecord
from .schema import validate_manifest


def verify(path: str, partial: bool = False) -> list[str]:
    """Check OUT/ against its manifest: every listed shard's files present with their checksums, row
    counts, rows + errors accounting for each shard's items, ids unique; the run finished (unless
    ``partial``); no shard file the manifest does not list (a ``part-*`` glob would read it); the
    error table present and matching.  Returns the problems (empty when intact).

    On an object store the folder is listed once and each listed shard's files are downloaded to a
    local temp folder, one shard at a time, to be checksummed and read like local ones."""
    path = storage.local_path(path)
    remote = storage.is_remote(path)
    manifest_path = storage.join(path, MANIFEST)
    try:
        if remote:
            manifest = json.loads(storage.read_bytes(manifest_path))
        else:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
    except (OSError, ValueError) as exc:
        reason = storage.describe(exc) if remote else exc
        where = storage.display(manifest_path) if remote else manifest_path
        raise OutputError(f"cannot read {where}: {reason}") from None
    validate_manifest(manifest, storage.display(manifest_path) if remote else manifest_path)
    listing = storage.list_dir(path) if remote else None  # name -> size of every object in OUT/
    config = manifest.get("config", {})
    metadata = config.get("metadata", {})
    layer_dims = {name: math.prod(shape) for name, shape in metadata.get("layers", {}).items()}
    sink = get_sink(config.get("format", DEFAULT_FORMAT))(Layout(layer_dims, metadata.get("dtype", "float16"), {}))
    records = [ShardRecord(**raw) for raw in manifest.get("shards", [])]
    problems: list[str] = []
    seen: set[str] = set()
    for rec in records:
        with _shard_paths(path, rec, listing) as paths:
            problems += _check_shard(rec, paths, sink, seen)
    problems += _completeness(manifest, records, partial)
    listed = {f["file"] for rec in records for f in rec.files()}
    for entry in sorted(listing if remote else os.listdir(path)):
        if SHARD_RE.match(entry) and not entry.endswith(".tmp") and entry not in listed:
            problems.append(f"{entry}: not listed in the manifest (a part-* glob would read its rows too)")
    if manifest.get("complete"):  # written when a run (or part) ends: an interrupted run's may be stale
        problems += _check_errors_table(path, records, listing)
    return problems


@contextlib.contextmanager
def _shard_paths(path: str, rec: ShardRecord, listing: dict[str, int | None] | None):
    """{file: local path} of a shard's files: in OUT/ itself, or (an object store, ``listing`` given)
    downloaded into a temp folder that is removed afterwards.  A file that is not there gets a path
    that does not exist."""
    if listing is None:
        yield {f["file"]: os.path.join(path, f["file"]) for f in rec.files()}
        return
    with tempfile.TemporaryDirectory(prefix="fastfeat-verify-") as folder:
        paths = {f["file"]: os.path.join(folder, f["file"]) for f in rec.files()}
        for name, local in paths.items():
            if listing.get(name) is not None:
                storage.download(storage.join(path, name), local)
        yield paths


def _check_shard(rec: ShardRecord, paths: dict[str, str], sink: Sink, seen: set[str]) -> list[str]:
    """The problems of one listed shard; adds its ids to ``seen``."""
    missing = [name for name, p in paths.items() if not os.path.isfile(p)]
    if missing:
        return [f"{name}: missing" for name in missing]
    problems = [f"{f['file']}: checksum mismatch" for f in rec.files() if file_sha256(paths[f["file"]]) != f["sha256"]]
    try:
        rows, ids = sink.inspect(paths)
    except Exception as exc:  # a damaged file raises various pyarrow/numpy errors
        return [*problems, f"{rec.file}: unreadable ({exc})"]
    if rows != rec.rows:
        problems.append(f"{rec.file}: {rows} rows, manifest says {rec.rows}")
    if rec.rows + len(rec.errors) != rec.end_item - rec.first_item:
        problems.append(
            f"{rec.file}: {rec.rows} rows + {len(rec.errors)} errors do not account for "
            f"items [{rec.first_item}, {rec.end_item})"
        )
    dup = seen.intersection(ids)
    if dup or len(set(ids)) != len(ids):
        problems.append(f"{rec.file}: duplicate ids, e.g. {sorted(dup)[:1] or ids[:1]}")
    seen.update(ids)
    return problems


def _completeness(manifest: dict, records: list[ShardRecord], partial: bool) -> list[str]:
    shard_size = max(manifest.get("config", {}).get("shard_size", 1), 1)
    expected = [k for k, _, _ in shard_tasks(manifest.get("generations", []), shard_size)]
    done = {r.index for r in records}
    missing = [k for k in expected if k not in done]
    if manifest.get("complete") and (missing or sorted(done) != expected):
        return [f"manifest says complete but lists shards {_ranges(sorted(done))}, expected 0..{len(expected) - 1}"]
    if missing and not partial:
        return [
            f"incomplete: {len(done)} of {len(expected)} shards finished, missing {_ranges(missing)}; rerun the same "
            "extract command to finish it (or pass --partial to check only the finished shards)"
        ]
    return []


def _check_errors_table(path: str, records: list[ShardRecord], listing: dict | None = None) -> list[str]:
    file = storage.join(path, ERRORS)
    if not (listing.get(ERRORS) is not None if listing is not None else os.path.isfile(file)):
        return [f"{ERRORS}: missing"]
    try:
        table = pq.read_table(storage.open_input_file(file) if listing is not None else file)
    except Exception as exc:  # a damaged file raises various pyarrow errors
        return [f"{ERRORS}: unreadable ({exc})"]
    skipped = sorted(e["id"] for r in records for e in r.errors)
    kept = table.column("kept").to_pylist() if "kept" in table.column_names else [False] * len(table)
    in_table = sorted(i for i, k in zip(table.column("id").to_pylist(), kept, strict=True) if not k)
    if in_table != skipped:
        return [f"{ERRORS}: {len(in_table)} skipped items, the manifest lists {len(skipped)}"]
    return []


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            parts.append(f"{start}" if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts) or "none"
