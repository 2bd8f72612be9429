"""Parquet feature shards, the manifest and the error table.

Layout of an output directory::

    OUT/part-00000.parquet   rows of items [0, S), S = --shard-size
    OUT/part-00001.parquet   rows of items [S, 2S) ...
    OUT/manifest.json        the run's configuration and every finished shard
    OUT/errors.parquet       id, stage, message of every image that was skipped
    OUT/summary.json         throughput and per-stage time of the last invocation

Shard k always covers the same slice of the input, whatever failed before, so a
run can be resumed shard by shard and its result equals an uninterrupted run.  A
shard is written as ``part-0000k.parquet.<pid>.tmp``, fsynced, checksummed and renamed; only then is
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
SHARD_RE = re.compile(r"^part-\d{5,}\.parquet(\.\d+\.tmp)?$")
TMP_RE = re.compile(r"^part-\d{5,}\.parquet\.(\d+)\.tmp$")
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


def _remove_orphan_tmp(folder: str) -> None:
    """Delete shard temp files whose writing process no longer exists (a killed run's partial shard)."""
    for entry in os.listdir(folder):
        m = TMP_RE.match(entry)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # that process is alive: a sibling part is writing it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, owned by another user
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, entry))


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
    bytes: int = 0  # file size: a truncated file is not taken as finished on resume
    errors: list[dict] = field(default_factory=list)


class OutputDir:
    """Owns OUT/: checks that it holds nothing or the same run, and records finished shards."""

    def __init__(self, path: str, config: dict, overwrite: bool = False):
        self.path = path
        self.config = config
        self.hash = config_hash(config)
        self.overwrite = overwrite
        self.shards: dict[int, ShardRecord] = {}
        self._check(self._read_manifest_if_any())

    # -- opening ----------------------------------------------------------------------------------
    def _read_manifest_if_any(self) -> dict | None:
        """The manifest of a run already in OUT/, None for a missing or empty OUT/; raises for foreign content."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise OutputError(f"output path exists and is not a directory: {self.path}")
        if not os.path.isdir(self.path) or not [e for e in os.listdir(self.path) if not e.startswith(".")]:
            return None
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise OutputError(
                f"output directory {self.path} is not empty and holds no fastfeat run; choose another --out"
            )
        try:
            with open(manifest_path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read {manifest_path}: {exc}") from None

    def _check(self, manifest: dict | None) -> None:
        """Same run: take its finished shards.  Different run: refuse, unless --overwrite (done in create)."""
        if manifest is None:
            return
        if manifest.get("config_hash") == self.hash:
            self._merge(manifest)
        elif not self.overwrite:
            raise OutputError(
                f"output directory {self.path} holds a different run ({_describe_diff(manifest.get('config', {}), self.config)}); "
                "use another --out, or --overwrite to replace it"
            )

    def _merge(self, manifest: dict) -> None:
        """Take the finished shards another process (or an earlier run) recorded, if their files are whole."""
        for rec in manifest.get("shards", []):
            rec = ShardRecord(**rec)
            file = os.path.join(self.path, rec.file)
            if rec.index not in self.shards and os.path.isfile(file) and os.path.getsize(file) == rec.bytes:
                self.shards[rec.index] = rec

    @contextlib.contextmanager
    def _locked(self):
        """Exclusive lock on OUT/.lock, then merge what is on disk: parts of one run share the manifest.

        A manifest of another configuration appearing meanwhile (another run started on the same
        OUT/) is an error: the two runs would overwrite each other's shards.
        """
        with open(os.path.join(self.path, LOCK), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    with open(os.path.join(self.path, MANIFEST), encoding="utf-8") as f:
                        on_disk = json.load(f)
                except (OSError, ValueError):
                    on_disk = {}
                if on_disk and on_disk.get("config_hash") != self.hash:
                    if not self.overwrite:
                        raise OutputError(f"another run with a different configuration is using {self.path}")
                    self._clear()  # --overwrite: exactly once, by whichever part takes the lock first
                    self.overwrite = False
                elif on_disk:
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

        Under the lock: an --overwrite clears the other run here, and temporary files left by killed
        writers (their process is gone) are removed.
        """
        try:
            os.makedirs(self.path, exist_ok=True)
            with self._locked():
                self.overwrite = False  # from now on a foreign manifest means a concurrent run
                _remove_orphan_tmp(self.path)
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
    """Streams the rows of one shard into ``part-k.parquet.<pid>.tmp`` and renames it when complete."""

    def __init__(self, out: OutputDir, index: int, first_item: int, end_item: int, schema: pa.Schema):
        self.out, self.index, self.first_item, self.end_item = out, index, first_item, end_item
        self.schema = schema
        self.final_path = os.path.join(out.path, shard_name(index))
        # Unique per writing process: a stray second writer of the same shard (a part restarted while
        # the old one still runs) can never write into this file.  Same content either way: the
        # output is deterministic, so whichever rename lands last is correct.
        self.tmp_path = f"{self.final_path}.{os.getpid()}.tmp"
        self.rows = 0
        self.errors: list[dict] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0
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
        # Checksum and size of the file this process wrote, taken before it becomes visible.
        record = ShardRecord(
            self.index,
            shard_name(self.index),
            self.rows,
            self.first_item,
            self.end_item,
            file_sha256(self.tmp_path),
            os.path.getsize(self.tmp_path),
            self.errors,
        )
        os.replace(self.tmp_path, self.final_path)
        _fsync_dir(self.out.path)
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
        if rec["rows"] + len(rec.get("errors", [])) != rec["end_item"] - rec["first_item"]:
            problems.append(
                f"{rec['file']}: {rec['rows']} rows + {len(rec.get('errors', []))} errors do not account for "
                f"items [{rec['first_item']}, {rec['end_item']})"
            )
        dup = seen.intersection(ids)
        if dup or len(set(ids)) != len(ids):
            problems.append(f"{rec['file']}: duplicate ids, e.g. {sorted(dup)[:1] or ids[:1]}")
        seen.update(ids)
    if manifest.get("complete"):
        config = manifest.get("config", {})
        expected = -(-config.get("items", 0) // max(config.get("shard_size", 1), 1))
        indices = sorted(r["index"] for r in manifest.get("shards", []))
        if indices != list(range(expected)):
            problems.append(f"manifest says complete but lists shards {indices}, expected 0..{expected - 1}")
    return problems
