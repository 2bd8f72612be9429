"""Parquet feature shards, the manifest and the error table.

Layout of an output directory::

    OUT/part-00000.parquet   rows of items [0, S), S = --shard-size
    OUT/part-00001.parquet   rows of items [S, 2S) ...
    OUT/manifest.json        the run's configuration and every finished shard
    OUT/errors.parquet       id, stage, message of every image that was skipped
    OUT/summary.json         throughput and per-stage time of the last invocation

Shard k always covers the same slice of the input, whatever failed before, so a
run can be resumed shard by shard and its result equals an uninterrupted run.  A
shard is written as ``part-0000k.parquet.tmp``, fsynced and renamed; only then is
it added to the manifest, which is itself replaced atomically.  A shard is
therefore either listed and complete, or not listed and redone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .checksum import file_sha256

MANIFEST = "manifest.json"
LOCK = ".lock"  # flock'd while the manifest is read-merged-written: several processes share one OUT
ERRORS = "errors.parquet"
SUMMARY = "summary.json"
FORMAT = "fastfeat/1"
SHARD_RE = re.compile(r"^part-\d{5,}\.parquet(\.tmp)?$")
# A row group holds about this many bytes of features: small enough to stream with
# bounded memory on read and write, large enough for efficient column chunks.
ROW_GROUP_BYTES = 64 << 20


class OutputError(ValueError):
    pass


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; the manifest is for every reader
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def feature_schema(layer_dims: dict[str, int], dtype: str, metadata: dict) -> pa.Schema:
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
    fields += [pa.field(name, pa.list_(value_type, dim), nullable=False) for name, dim in layer_dims.items()]
    return pa.schema(fields, metadata={"fastfeat": json.dumps(metadata, sort_keys=True)})


@dataclass
class ShardRecord:
    index: int
    file: str
    rows: int
    first_item: int
    end_item: int
    sha256: str
    errors: list[dict] = field(default_factory=list)


class OutputDir:
    """Owns OUT/: checks that it holds nothing or the same run, and records finished shards."""

    def __init__(self, path: str, config: dict, overwrite: bool = False):
        self.path = path
        self.config = config
        self.hash = config_hash(config)
        self.shards: dict[int, ShardRecord] = {}
        self._prepare(overwrite)

    # -- opening ----------------------------------------------------------------------------------
    def _prepare(self, overwrite: bool) -> None:
        manifest_path = os.path.join(self.path, MANIFEST)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise OutputError(f"output path exists and is not a directory: {self.path}")
        if not os.path.isdir(self.path):
            return
        entries = [e for e in os.listdir(self.path) if not e.startswith(".")]
        if not entries:
            return
        if not os.path.isfile(manifest_path):
            raise OutputError(
                f"output directory {self.path} is not empty and holds no fastfeat run; choose another --out"
            )
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read {manifest_path}: {exc}") from None
        if manifest.get("config_hash") != self.hash:
            if not overwrite:
                raise OutputError(
                    f"output directory {self.path} holds a different run ({_describe_diff(manifest.get('config', {}), self.config)}); "
                    "use another --out, or --overwrite to replace it"
                )
            self._clear()
            return
        self._merge(manifest)

    def _merge(self, manifest: dict) -> None:
        """Take the finished shards another process (or an earlier run) recorded."""
        for rec in manifest.get("shards", []):
            rec = ShardRecord(**rec)
            if rec.index not in self.shards and os.path.isfile(os.path.join(self.path, rec.file)):
                self.shards[rec.index] = rec

    @contextlib.contextmanager
    def _locked(self):
        """Exclusive lock on OUT/.lock, then merge what is on disk: parts of one run share the manifest."""
        with open(os.path.join(self.path, LOCK), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    with open(os.path.join(self.path, MANIFEST), encoding="utf-8") as f:
                        on_disk = json.load(f)
                except (OSError, ValueError):
                    on_disk = {}
                if on_disk.get("config_hash") == self.hash:
                    self._merge(on_disk)
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _clear(self) -> None:
        for entry in os.listdir(self.path):
            if SHARD_RE.match(entry) or entry in (MANIFEST, ERRORS, SUMMARY) or entry.startswith(".tmp-"):
                os.unlink(os.path.join(self.path, entry))

    def create(self) -> None:
        """Create OUT/ (only once the run is known to be valid: bad arguments write nothing).

        Leftover ``.tmp`` files of a killed run are removed by ShardWriter when it
        rewrites that shard (a sibling process may be writing its own right now).
        """
        try:
            os.makedirs(self.path, exist_ok=True)
            with self._locked():
                self._write_manifest(complete=False)
        except OSError as exc:
            raise OutputError(f"cannot write to output directory {self.path}: {exc.strerror or exc}") from None

    # -- records ----------------------------------------------------------------------------------
    def _write_manifest(self, complete: bool) -> None:
        manifest = {
            "format": FORMAT,
            "config_hash": self.hash,
            "config": self.config,
            "complete": complete,
            "rows": sum(r.rows for r in self.shards.values()),
            "shards": [vars(self.shards[k]) for k in sorted(self.shards)],
        }
        _atomic_write(os.path.join(self.path, MANIFEST), json.dumps(manifest, indent=1).encode())

    def commit_shard(self, record: ShardRecord) -> None:
        with self._locked():
            self.shards[record.index] = record
            self._write_manifest(complete=False)

    def finish(self, n_shards: int) -> bool:
        """Record completion (when every shard of every part is done) and write errors.parquet."""
        with self._locked():
            complete = len(self.shards) == n_shards
            self._write_manifest(complete=complete)
            self._write_errors()
        return complete

    def _write_errors(self) -> None:
        errors = [e for k in sorted(self.shards) for e in self.shards[k].errors]
        table = pa.table(
            {
                "id": pa.array([e["id"] for e in errors], pa.string()),
                "stage": pa.array([e["stage"] for e in errors], pa.string()),
                "message": pa.array([e["message"] for e in errors], pa.string()),
            }
        )
        tmp = os.path.join(self.path, ".tmp-" + ERRORS)
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, os.path.join(self.path, ERRORS))

    def write_summary(self, summary: dict) -> None:
        _atomic_write(os.path.join(self.path, SUMMARY), json.dumps(summary, indent=1).encode())


def _describe_diff(old: dict, new: dict) -> str:
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not diffs:
        return "different configuration"
    k = diffs[0]
    return f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"


class ShardWriter:
    """Streams the rows of one shard into ``part-k.parquet.tmp`` and renames it when complete."""

    def __init__(self, out: OutputDir, index: int, first_item: int, end_item: int, schema: pa.Schema):
        self.out, self.index, self.first_item, self.end_item = out, index, first_item, end_item
        self.schema = schema
        self.final_path = os.path.join(out.path, shard_name(index))
        self.tmp_path = self.final_path + ".tmp"
        self.rows = 0
        self.errors: list[dict] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0
        # A stale .tmp of this shard (killed run) is simply overwritten.
        self._writer = pq.ParquetWriter(self.tmp_path, schema, compression="zstd", write_statistics=["id"])

    def add(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._pending_bytes += batch.nbytes
        self.rows += batch.num_rows
        if self._pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def add_errors(self, errors: list[dict]) -> None:
        self.errors.extend(errors)

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending, self.schema), row_group_size=1 << 30)
            self._pending, self._pending_bytes = [], 0

    def close(self) -> ShardRecord:
        self._flush()
        self._writer.close()
        with open(self.tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp_path, self.final_path)
        _fsync_dir(self.out.path)
        record = ShardRecord(
            self.index,
            shard_name(self.index),
            self.rows,
            self.first_item,
            self.end_item,
            file_sha256(self.final_path),
            self.errors,
        )
        self.out.commit_shard(record)
        return record

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.unlink(self.tmp_path)


def record_batch(
    schema: pa.Schema,
    ids: list[str],
    labels: list[str | None],
    sizes: list[tuple[int, int]],
    features: dict[str, np.ndarray],
) -> pa.RecordBatch:
    """Build one Arrow batch; ``features[name]`` is a C-contiguous [rows, dim] array of the column's dtype."""
    columns = [
        pa.array(ids, pa.string()),
        pa.array(labels, pa.string()),
        pa.array([w for w, _ in sizes], pa.int32()),
        pa.array([h for _, h in sizes], pa.int32()),
    ]
    for name in schema.names[4:]:
        values = features[name]
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def verify(path: str) -> list[str]:
    """Check every shard listed in OUT/manifest.json: present, checksum, row count, ids unique.

    Returns a list of problems (empty when the output is intact).
    """
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot read {manifest_path}: {exc}") from None
    problems: list[str] = []
    seen: set[str] = set()
    for rec in manifest.get("shards", []):
        file = os.path.join(path, rec["file"])
        if not os.path.isfile(file):
            problems.append(f"{rec['file']}: missing")
            continue
        if file_sha256(file) != rec["sha256"]:
            problems.append(f"{rec['file']}: checksum mismatch")
        try:
            pf = pq.ParquetFile(file)
            rows = pf.metadata.num_rows
            ids = pf.read(columns=["id"]).column(0).to_pylist()
        except Exception as exc:  # a damaged file raises various pyarrow errors
            problems.append(f"{rec['file']}: unreadable ({exc})")
            continue
        if rows != rec["rows"]:
            problems.append(f"{rec['file']}: {rows} rows, manifest says {rec['rows']}")
        dup = seen.intersection(ids)
        if dup or len(set(ids)) != len(ids):
            problems.append(f"{rec['file']}: duplicate ids, e.g. {sorted(dup)[:1] or ids[:1]}")
        seen.update(ids)
    if manifest.get("complete") and sum(r["rows"] for r in manifest.get("shards", [])) != manifest.get("rows"):
        problems.append("manifest row total does not match its shards")
    return problems
