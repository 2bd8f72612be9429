"""``fastfeat.data``: the shards of an output directory as training data.

* :class:`FeatureDataset`, a ``torch.utils.data.IterableDataset`` that yields whole batches
  (``DataLoader(ds, batch_size=None)``): ``{layer: Tensor[B, dim], "label": LongTensor[B],
  "row": LongTensor[B]}`` and, on request, ``"id"`` (a list of strings);
* :func:`load`, for sets that fit in memory: ids, labels and one numpy matrix;
* :func:`parquet_files`, the finished Parquet shards by path (for Hugging Face ``datasets``,
  DuckDB, Polars: they read the shards with no other glue).

**Manifest, not glob.** Only the shards listed in ``manifest.json`` are read, in shard order, so a
partial shard of an unfinished or killed run (``part-*.tmp``, or a file not yet listed) is never
seen.  Rows are numbered in that order ("row" in each batch): row r is the same image whatever
the shuffling, the world size or the number of workers.

**Object storage.** ``path`` may be a URI (``s3://bucket/run``, see :mod:`fastfeat.storage`): the
manifest and the listed shards are then read through ``pyarrow.fs`` (a Parquet row group, or an npy
block, is one ranged GET), with the same rows in the same order.

**Units.** The work is split in *units*: a Parquet row group (about 64 MB, see
``fastfeat.sinks.parquet``), or for ``--format npy`` a block of rows of the same size cut from the
memory-mapped arrays.  Each epoch the units are dealt round-robin to the ``world_size × num_workers``
consumers (``torch.distributed`` ranks × ``DataLoader`` workers), so every row is read by exactly
one consumer, however the shard sizes divide.  Consumers may get different row counts (by up to
one unit): exactly once is kept, equal counts are not.

**Shuffling.** With ``shuffle=True`` the unit order is a permutation drawn from ``(seed, epoch)``
(the same on every rank), and each consumer shuffles its rows within *windows*: consecutive units
of its share, at least ``shuffle_buffer`` rows each, permuted from ``(seed, epoch, consumer,
window)``.  This is a bounded shuffle buffer whose every state is a pure function of those seeds,
so a resume needs only a row count (a classic reservoir buffer would have to save its contents).
Memory stays below two windows plus one unit: the next window is read on a thread meanwhile.

**Resume.** ``state_dict()`` is ``{epoch, seed, consumer, consumers, rows}`` of the live iterator;
after ``load_state_dict(state)`` the next iterator skips the windows it already emitted without
reading them and yields exactly the remaining rows, in the same batches.  torchdata's
``StatefulDataLoader`` calls both in each worker, so it resumes mid-epoch as it is.

**Labels.** Strings map to integers through the run's class index (:func:`class_index`): the
labels of the first extraction sorted, then each ``--append`` generation's new labels sorted after
them, read from the item lists the manifest records.  An index never changes once given, and an
unlabelled row gets -1.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq
import torch

from . import storage
from .errors import FastfeatError
from .output.layout import MANIFEST
from .output.schema import ManifestError, validate_manifest
from .sinks.npy import HEADER_BYTES
from .sinks.parquet import ROW_GROUP_BYTES

FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
DEFAULT_SHUFFLE_BUFFER = 8192  # rows: 64 MB of relu7 float16, a few row groups of 4096-d features


class DataError(FastfeatError):
    """An output directory that cannot be read as asked (missing manifest, unknown layer...)."""


@dataclass(frozen=True)
class Unit:
    """Rows [start, start + rows) of the manifest's shard number ``shard``; ``group`` is the Parquet
    row group (npy: the block number); ``first_row`` is the global number of its first row."""

    shard: int
    group: int
    start: int
    rows: int
    first_row: int


def read_manifest(path: str) -> dict:
    path = storage.local_path(path)
    file = storage.join(path, MANIFEST)
    try:
        if storage.is_remote(path):
            manifest = json.loads(storage.read_bytes(file))
        else:
            with open(file, encoding="utf-8") as f:
                manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{storage.display(path)} holds no {MANIFEST}: not a fastfeat output directory") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {storage.display(file)}: {storage.describe(exc)}") from None
    try:
        return validate_manifest(manifest, storage.display(file))
    except ManifestError as exc:
        raise DataError(str(exc)) from None


def _input(location: str):
    """What pyarrow's readers take for ``location``: the local path, or an open remote file."""
    return storage.open_input_file(location) if storage.is_remote(location) else location


def class_index(path: str, manifest: dict | None = None) -> list[str]:
    """The run's classes, index = position: each generation's new labels, sorted, after the earlier ones."""
    manifest = read_manifest(path) if manifest is None else manifest
    classes: list[str] = []
    seen: set[str] = set()
    for generation in manifest.get("generations", []):
        file = storage.join(storage.local_path(path), generation["items_file"])
        # The item list is Arrow IPC (.arrow); runs made before that wrote it as Parquet.
        read = pq.read_table if generation["items_file"].endswith(".parquet") else feather.read_table
        labels = read(_input(file), columns=["label"]).column(0)
        new = sorted(set(pc.unique(labels).drop_null().to_pylist()) - seen)
        classes += new
        seen.update(new)
    return classes


class Shards:
    """The finished shards of an output directory, cut into units; reads one unit at a time."""

    def __init__(self, path: str):
        self.path = storage.local_path(path)
        self.remote = storage.is_remote(self.path)
        self.manifest = read_manifest(path)
        config = self.manifest.get("config", {})
        self.format = config.get("format", "parquet")
        if self.format not in ("parquet", "npy"):
            raise DataError(f"{path}: unknown output format {self.format!r}")
        metadata = config.get("metadata", {})
        self.layer_dims = {name: math.prod(shape) for name, shape in metadata.get("layers", {}).items()}
        self.stored_dtype = metadata.get("dtype", "float16")
        self.metadata = metadata
        self.records = sorted(self.manifest.get("shards", []), key=lambda r: r["index"])
        self.units = self._units()
        self.num_rows = sum(r["rows"] for r in self.records)
        self._cache: tuple[int, pa.Table] | None = None  # npy: the last shard's id/label table

    def __getstate__(self):  # DataLoader workers get a copy without open tables
        return {**self.__dict__, "_cache": None}

    def _units(self) -> list[Unit]:
        units, first = [], 0
        row_bytes = sum(self.layer_dims.values()) * np.dtype(self.stored_dtype).itemsize
        block = max(1, ROW_GROUP_BYTES // max(row_bytes, 1))  # npy: blocks the size of a Parquet row group
        for k, rec in enumerate(self.records):
            if self.format == "parquet":
                meta = pq.ParquetFile(_input(self.file(rec["file"]))).metadata
                sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            else:
                sizes = [min(block, rec["rows"] - s) for s in range(0, rec["rows"], block)]
            if sum(sizes) != rec["rows"]:
                raise DataError(f"{rec['file']}: {sum(sizes)} rows, the manifest says {rec['rows']}")
            start = 0
            for g, n in enumerate(sizes):
                if n:
                    units.append(Unit(k, g, start, n, first + start))
                start += n
            first += rec["rows"]
        return units

    def file(self, name: str) -> str:
        return storage.join(self.path, name)

    def fingerprint(self) -> str:
        """Identifies the rows: every listed file's checksum, in order."""
        files = [(f["file"], f["sha256"]) for rec in self.records for f in [rec, *rec.get("extra_files", [])]]
        return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]

    def check_layers(self, layers: str | list[str]) -> list[str]:
        names = [layers] if isinstance(layers, str) else list(layers)
        missing = [n for n in names if n not in self.layer_dims]
        if not names or missing:
            raise DataError(
                f"{self.path} has no layer {', '.join(missing) or '(none given)'}; it holds {', '.join(self.layer_dims)}"
            )
        return names

    def _npy_file(self, rec: dict, layer: str) -> str:
        name = rec["file"].removesuffix(".ids.parquet") + f".{layer}.npy"
        if name not in {f["file"] for f in rec.get("extra_files", [])}:
            raise DataError(f"{rec['file']}: the manifest lists no {name}")
        return self.file(name)

    def _row_table(self, unit: Unit, columns: list[str]) -> pa.Table:
        rec = self.records[unit.shard]
        if self.format == "parquet":
            return pq.ParquetFile(_input(self.file(rec["file"]))).read_row_group(unit.group, columns=columns)
        if self._cache is None or self._cache[0] != unit.shard:
            self._cache = (unit.shard, pq.read_table(_input(self.file(rec["file"])), columns=["id", "label"]))
        return self._cache[1].select(columns).slice(unit.start, unit.rows)

    def read(self, unit: Unit, layers: list[str], ids: bool = False, select: np.ndarray | None = None) -> dict:
        """``{layer: [n, dim] array (stored dtype)}, "label": string array, ["id"]`` of the unit's rows
        (only those at positions ``select`` within it, when given)."""
        row_columns = ["label", "id"] if ids else ["label"]
        if self.format == "parquet":
            table = self._row_table(unit, [*layers, *row_columns])
            out = {n: _fixed_size_list_matrix(table.column(n), self.layer_dims[n]) for n in layers}
        else:
            table = self._row_table(unit, row_columns)
            rec = self.records[unit.shard]
            out = {n: self._npy_rows(self._npy_file(rec, n), n, unit.start, unit.rows) for n in layers}
        if select is not None:
            out = {n: a[select] for n, a in out.items()}  # fancy indexing copies: the mmap is let go
            table = table.take(pa.array(select))
        else:
            out = {n: np.array(a) if not a.flags.writeable else a for n, a in out.items()}
        out["label"] = table.column("label").combine_chunks()
        if ids:
            out["id"] = table.column("id").combine_chunks()
        return out

    def _npy_rows(self, file: str, layer: str, start: int, rows: int) -> np.ndarray:
        """Rows [start, start + rows) of a layer's .npy: a memory map, or (remote) one ranged read of just
        those rows after the sink's fixed-size header."""
        if not self.remote:
            return np.load(file, mmap_mode="r")[start : start + rows]
        dim, dtype = self.layer_dims[layer], np.dtype(self.stored_dtype)
        row_bytes = dim * dtype.itemsize
        with storage.open_input_file(file) as f:
            data = f.read_at(rows * row_bytes, HEADER_BYTES + start * row_bytes)
        if len(data) != rows * row_bytes:
            raise DataError(f"{storage.display(file)}: {len(data)} bytes at row {start}, expected {rows * row_bytes}")
        return np.frombuffer(data, dtype).reshape(rows, dim)

    def labels(self) -> pa.Array:
        """The label of every row, in row order (reads only the label column)."""
        chunks = []
        for rec in self.records:
            chunks += pq.read_table(_input(self.file(rec["file"])), columns=["label"]).column(0).chunks
        return pa.chunked_array(chunks, pa.string()).combine_chunks() if chunks else pa.array([], pa.string())


def _fixed_size_list_matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """A fixed_size_list<float> column as one [rows, dim] array, with no per-row Python work."""
    values = column.combine_chunks().flatten()  # flatten() honours slice offsets, .values would not
    return values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def label_codes(labels: pa.Array, classes: list[str]) -> np.ndarray:
    """int64 class index per label (-1 for a missing one), vectorised in Arrow."""
    codes = pc.index_in(labels, value_set=pa.array(classes, pa.string()))
    return codes.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _selection(shards: Shards, rows) -> list[tuple[Unit, np.ndarray | None]]:
    """Every unit with the positions of its selected rows (None: all); units with none are dropped."""
    if rows is None:
        return [(u, None) for u in shards.units]
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if rows.size and (rows[0] < 0 or rows[-1] >= shards.num_rows):
        raise DataError(f"rows must be in [0, {shards.num_rows}), got {rows[0]}..{rows[-1]}")
    out = []
    for u in shards.units:
        lo, hi = np.searchsorted(rows, [u.first_row, u.first_row + u.rows])
        if hi > lo:
            out.append((u, None if hi - lo == u.rows else rows[lo:hi] - u.first_row))
    return out


def _rows_of(selected: tuple[Unit, np.ndarray | None]) -> int:
    unit, select = selected
    return unit.rows if select is None else len(select)


class FeatureDataset(torch.utils.data.IterableDataset):
    """Batches of an output directory's features, each row exactly once per epoch (see the module).

    ``layers``: a layer name or a list of them.  ``dtype``: None keeps the stored type (float16 or
    float32), or "float16"/"float32".  ``rows``: only these global row numbers (a split).  ``rank``
    and ``world_size`` default to ``torch.distributed``'s when it is initialised, else 0 and 1.
    """

    def __init__(
        self, path: str, layers: str | list[str] = "relu7", *, batch_size: int = 256, shuffle: bool = False,
        seed: int = 0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, dtype: str | None = None, rows=None,
        ids: bool = False, drop_last: bool = False, rank: int | None = None, world_size: int | None = None,
    ):  # fmt: skip
        super().__init__()
        if batch_size < 1 or shuffle_buffer < 1:
            raise DataError(f"batch_size and shuffle_buffer must be >= 1, got {batch_size} and {shuffle_buffer}")
        if dtype is not None and dtype not in FEATURE_DTYPES:
            raise DataError(f"unknown dtype {dtype!r}; choose float16 or float32 (or None: as stored)")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise DataError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.shards = Shards(path)
        self.layers = self.shards.check_layers(layers)
        self.classes = class_index(path, self.shards.manifest)
        self.batch_size, self.shuffle, self.seed, self.shuffle_buffer = batch_size, shuffle, seed, shuffle_buffer
        self.dtype, self.ids, self.drop_last = dtype, ids, drop_last
        self.rank, self.world_size = rank, world_size
        self.selected = _selection(self.shards, rows)
        self.num_rows = sum(_rows_of(s) for s in self.selected)
        self.epoch = 0
        # What the state of an iterator means depends on these: a resume must see the same.
        identity = hashlib.sha256(json.dumps([self.shards.fingerprint(), shuffle, shuffle_buffer]).encode())
        for unit, select in self.selected:
            identity.update(np.array([unit.first_row, unit.rows], np.int64).tobytes())
            identity.update(b"" if select is None else select.astype(np.int64).tobytes())
        self._identity = identity.hexdigest()[:16]
        self._state: dict | None = None  # the live iterator's progress
        self._resume: dict | None = None  # set by load_state_dict, used by the next iterator

    def set_epoch(self, epoch: int) -> None:
        """Before each epoch, as DistributedSampler: the shuffle is drawn from (seed, epoch).

        With ``persistent_workers=True`` the workers keep their copy: the call does not reach them."""
        self.epoch = epoch

    def labels(self) -> np.ndarray:
        """The class index of every selected row (-1: unlabelled), in row order."""
        all_labels = label_codes(self.shards.labels(), self.classes)
        return np.concatenate([all_labels[u.first_row : u.first_row + u.rows][s if s is not None else slice(None)]
                               for u, s in self.selected]) if self.selected else np.zeros(0, np.int64)  # fmt: skip

    def state_dict(self) -> dict:
        if self._state is not None:
            return dict(self._state)
        if self._resume is not None:  # restored but not iterated yet
            return dict(self._resume)
        return {"identity": self._identity, "seed": self.seed, "epoch": self.epoch, "rows": 0}

    def load_state_dict(self, state: dict) -> None:
        if state.get("identity") != self._identity:
            raise DataError("this state belongs to another dataset (other rows, shuffle or shuffle_buffer)")
        self.seed, self.epoch = state["seed"], state["epoch"]
        self._resume, self._state = dict(state), None

    def _consumer(self) -> tuple[int, int]:
        rank, world = self.rank, self.world_size
        if rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def _windows(self, consumer: int, consumers: int) -> list[list[tuple[Unit, np.ndarray | None]]]:
        """This consumer's units for the epoch, grouped into shuffle windows (one unit each unshuffled)."""
        order = np.arange(len(self.selected))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.selected))
        mine = [self.selected[i] for i in order[consumer::consumers]]
        if not self.shuffle:
            return [[s] for s in mine]
        windows, current, n = [], [], 0
        for s in mine:
            current.append(s)
            n += _rows_of(s)
            if n >= self.shuffle_buffer:
                windows.append(current)
                current, n = [], 0
        return windows + ([current] if current else [])

    def _read_window(self, window, index: int, consumer: int) -> dict:
        parts = [self.shards.read(u, self.layers, self.ids, s) for u, s in window]
        out = {n: np.concatenate([p[n] for p in parts]) if len(parts) > 1 else parts[0][n] for n in self.layers}
        out["label"] = label_codes(pa.concat_arrays([p["label"] for p in parts]), self.classes)
        out["row"] = np.concatenate([u.first_row + (np.arange(u.rows) if s is None else s) for u, s in window]).astype(
            np.int64
        )
        if self.ids:
            out["id"] = pa.concat_arrays([p["id"] for p in parts])
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.epoch, consumer, index]).permutation(len(out["row"]))
            out = {k: (v.take(pa.array(perm)) if k == "id" else v[perm]) for k, v in out.items()}
        return out

    def __iter__(self):
        consumer, consumers = self._consumer()
        start = 0
        if self._resume is not None:
            resume, self._resume = self._resume, None
            if resume.get("rows") and (resume.get("consumer"), resume.get("consumers")) != (consumer, consumers):
                raise DataError(
                    f"cannot resume: the state is consumer {resume.get('consumer')} of {resume.get('consumers')}, "
                    f"this iterator is {consumer} of {consumers} (same world size and num_workers needed)"
                )
            start = resume.get("rows", 0)
        self._state = {"identity": self._identity, "seed": self.seed, "epoch": self.epoch,
                       "consumer": consumer, "consumers": consumers, "rows": start}  # fmt: skip
        todo, offset = [], 0  # (window index, window, rows to skip in it); offset: rows before the window
        for index, window in enumerate(self._windows(consumer, consumers)):
            rows = sum(_rows_of(s) for s in window)
            if offset + rows > start:  # windows emitted before the resume point are not even read
                todo.append((index, window, max(0, start - offset)))
            offset += rows
        pending: list[dict] = []
        held = 0  # rows in pending
        # One window is read ahead on a thread while the last one's batches are consumed: Parquet
        # decoding and zstd release the GIL, so reading overlaps the training step (memory: +1 window).
        with ThreadPoolExecutor(1, thread_name_prefix="fastfeat-data") as pool:
            ahead = pool.submit(self._read_window, todo[0][1], todo[0][0], consumer) if todo else None
            for k, (_, _, skip) in enumerate(todo):
                part = ahead.result()
                if k + 1 < len(todo):
                    ahead = pool.submit(self._read_window, todo[k + 1][1], todo[k + 1][0], consumer)
                if skip:
                    part = {key: v[skip:] for key, v in part.items()}
                pending.append(part)
                held += len(part["row"])
                while held >= self.batch_size:
                    batch, pending, held = _take(pending, self.batch_size, held)
                    yield self._emit(batch)
        if held and not self.drop_last:
            batch, pending, held = _take(pending, held, held)
            yield self._emit(batch)

    def _emit(self, batch: dict) -> dict:
        out = {}
        for n in self.layers:
            t = torch.from_numpy(batch[n])
            out[n] = t if self.dtype is None else t.to(FEATURE_DTYPES[self.dtype])
        out["label"] = torch.from_numpy(batch["label"])
        out["row"] = torch.from_numpy(batch["row"])
        if self.ids:
            out["id"] = batch["id"].to_pylist()
        self._state["rows"] += len(batch["row"])  # counted before the yield: state_dict() follows the batch
        return out


def _take(pending: list[dict], n: int, held: int) -> tuple[dict, list[dict], int]:
    """The first n rows of the pending parts as one batch (one copy when it spans parts), and the rest."""
    parts, got = [], 0
    while got < n:
        part = pending[0]
        size = len(part["row"])
        if got + size <= n:
            parts.append(pending.pop(0))
            got += size
        else:
            k = n - got
            parts.append({key: v[:k] for key, v in part.items()})
            pending[0] = {key: v[k:] for key, v in part.items()}
            got = n
    if len(parts) == 1:
        batch = parts[0]
        # A view of a window: copy only when it is not contiguous (torch.from_numpy needs writeable memory).
        batch = {k: (v if k == "id" else np.ascontiguousarray(v)) for k, v in batch.items()}
    else:
        batch = {k: (pa.concat_arrays([p[k] for p in parts]) if k == "id" else np.concatenate([p[k] for p in parts]))
                 for k in parts[0]}  # fmt: skip
    return batch, pending, held - n


def load(path: str, layer: str, dtype: str | None = None, rows=None) -> tuple[list[str], list[str | None], np.ndarray]:
    """(ids, labels, [rows, dim] features) of every finished row, in row order, for sets that fit in memory.

    ``dtype``: None keeps the stored type; ``rows``: only these global row numbers."""
    shards = Shards(path)
    (name,) = shards.check_layers(layer)
    if dtype is not None and dtype not in FEATURE_DTYPES:
        raise DataError(f"unknown dtype {dtype!r}; choose float16 or float32 (or None: as stored)")
    selected = _selection(shards, rows)
    out_dtype = np.dtype(dtype or shards.stored_dtype)
    features = np.empty((sum(_rows_of(s) for s in selected), shards.layer_dims[name]), out_dtype)
    ids: list[str] = []
    labels: list[str | None] = []
    at = 0
    for unit, select in selected:
        part = shards.read(unit, [name], ids=True, select=select)
        features[at : at + len(part[name])] = part[name]
        at += len(part[name])
        ids += part["id"].to_pylist()
        labels += part["label"].to_pylist()
    return ids, labels, features


def load_labels(path: str) -> tuple[list[str], np.ndarray]:
    """(classes, class index of every row, -1 unlabelled), reading only the label column."""
    shards = Shards(path)
    classes = class_index(path, shards.manifest)
    return classes, label_codes(shards.labels(), classes)


def parquet_files(path: str) -> list[str]:
    """The finished Parquet shards, in order: ``datasets.load_dataset("parquet", data_files=parquet_files(DIR))``."""
    shards = Shards(path)
    if shards.format != "parquet":
        raise DataError(f"{path} holds --format {shards.format} shards; parquet_files needs --format parquet")
    return [shards.file(rec["file"]) for rec in shards.records]


__all__ = ["DataError", "FeatureDataset", "class_index", "load", "load_labels", "parquet_files"]
