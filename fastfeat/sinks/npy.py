"""``.npy`` shards: per shard one memory-mappable ``part-0000k.<layer>.npy`` per layer
([rows, dim], float16 or float32) and ``part-0000k.ids.parquet`` with id, label, width and height
of the same rows in the same order (its schema metadata holds the run's metadata, as a Parquet
shard's does).

Read one layer of a whole run with ``np.load(path, mmap_mode="r")`` per shard, in manifest order.

The array is streamed: a fixed-length header is written first with room for the largest possible
row count, the rows are appended as they come, and the header is rewritten with the real count on
close (NumPy pads headers with spaces, so the length can stay the same).
"""

from __future__ import annotations

import ast
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .base import Layout, Rows, ShardFileError, ShardWriter, Sink, register_sink
from .parquet import row_arrays, row_fields

MAGIC = b"\x93NUMPY\x01\x00"  # format version 1.0: header length fits in a uint16
HEADER_BYTES = 128  # magic + length + dict, a multiple of 64 as NumPy aligns the data


def npy_header(dtype: np.dtype, rows: int, dim: int) -> bytes:
    text = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    pad = HEADER_BYTES - len(MAGIC) - 2 - len(text) - 1
    if pad < 0:
        raise ValueError(f"npy header of shape ({rows}, {dim}) does not fit in {HEADER_BYTES} bytes")
    return MAGIC + (HEADER_BYTES - len(MAGIC) - 2).to_bytes(2, "little") + text.encode() + b" " * pad + b"\n"


def read_npy_shape(path: str) -> tuple[np.dtype, tuple[int, ...]]:
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if not head.startswith(MAGIC):
        raise ShardFileError(f"{os.path.basename(path)}: not a .npy file of format 1.0")
    header = ast.literal_eval(head[len(MAGIC) + 2 :].decode("latin1").strip())
    return np.dtype(header["descr"]), tuple(header["shape"])


class _NpyShardWriter(ShardWriter):
    def __init__(self, paths: dict[str, str], layout: Layout, ids_name: str, layer_names: dict[str, str]):
        self.layout = layout
        self.dtype = np.dtype(layout.dtype)
        self.ids_path = paths[ids_name]
        self.rows = 0
        self._row_columns: list[list[pa.Array]] = []
        self._files = {}
        try:
            for layer, file in layer_names.items():
                self._files[layer] = f = open(paths[file], "wb")
                f.write(npy_header(self.dtype, 0, layout.layer_dims[layer]))
        except BaseException:  # no writer is returned, so no abort() comes: close what was opened
            self.abort()
            raise

    def add(self, rows: Rows) -> None:
        for layer, f in self._files.items():
            values = rows.features[layer]
            if values.dtype != self.dtype or values.shape != (len(rows), self.layout.layer_dims[layer]):
                raise ValueError(f"{layer}: got {values.dtype}{list(values.shape)} for {len(rows)} rows")
            f.write(np.ascontiguousarray(values).data)
        self._row_columns.append(row_arrays(rows))
        self.rows += len(rows)

    def close(self) -> int:
        for layer, f in self._files.items():  # a failure here leaves the rest to abort() (closing twice is fine)
            f.seek(0)
            f.write(npy_header(self.dtype, self.rows, self.layout.layer_dims[layer]))
            f.close()
        schema = pa.schema(row_fields(), metadata={"fastfeat": self.layout.metadata_json})
        columns = [pa.concat_arrays([b[i] for b in self._row_columns]) if self._row_columns else pa.array([], f.type)
                   for i, f in enumerate(schema)]  # fmt: skip
        pq.write_table(pa.Table.from_arrays(columns, schema=schema), self.ids_path, compression="zstd")
        return self.rows

    def abort(self) -> None:
        for f in self._files.values():
            f.close()


@register_sink
class NpySink(Sink):
    name = "npy"
    description = "part-k.<layer>.npy per layer (memory-mappable) and part-k.ids.parquet with id, label, width, height"

    def _names(self, index: int) -> tuple[str, dict[str, str]]:
        stem = f"part-{index:05d}"
        return f"{stem}.ids.parquet", {layer: f"{stem}.{layer}.npy" for layer in self.layout.layer_dims}

    def shard_files(self, index: int) -> list[str]:
        ids_name, layer_files = self._names(index)
        return [ids_name, *layer_files.values()]

    def open(self, paths: dict[str, str]) -> ShardWriter:
        ids_name, layer_files = self._names(_index_of(next(iter(paths))))
        return _NpyShardWriter(paths, self.layout, ids_name, layer_files)

    def inspect(self, paths: dict[str, str]) -> tuple[int, list[str]]:
        names = list(paths)
        ids = pq.read_table(paths[names[0]], columns=["id"]).column(0).to_pylist()
        for name in names[1:]:
            dtype, shape = read_npy_shape(paths[name])
            expected = os.path.getsize(paths[name]) - HEADER_BYTES
            if len(shape) != 2 or shape[0] != len(ids) or shape[0] * shape[1] * dtype.itemsize != expected:
                raise ShardFileError(f"{name}: shape {shape} ({dtype}) does not match {len(ids)} ids and the file size")
        return len(ids), ids


def _index_of(file_name: str) -> int:
    return int(file_name.split(".", 1)[0].removeprefix("part-"))
