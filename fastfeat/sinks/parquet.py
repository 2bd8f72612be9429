"""Parquet shards: ``part-0000k.parquet``, one row per image, one fixed-size-list column per layer.

zstd-compressed, row groups of about ROW_GROUP_BYTES so readers and the writer stream with
bounded memory; the schema metadata key ``fastfeat`` holds the run's metadata as JSON.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .base import Layout, Rows, ShardWriter, Sink, register_sink

# A row group holds about this many bytes of features: small enough to stream with
# bounded memory on read and write, large enough for efficient column chunks.
ROW_GROUP_BYTES = 64 << 20
ROW_COLUMNS = ("id", "label", "width", "height")  # before the feature columns, in this order


def row_fields() -> list[pa.Field]:
    return [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]


def row_arrays(rows: Rows) -> list[pa.Array]:
    return [
        pa.array(rows.ids, pa.string()),
        pa.array(rows.labels, pa.string()),
        pa.array([w for w, _ in rows.sizes], pa.int32()),
        pa.array([h for _, h in rows.sizes], pa.int32()),
    ]


def feature_schema(layout: Layout) -> pa.Schema:
    value_type = pa.float16() if layout.dtype == "float16" else pa.float32()
    fields = row_fields() + [pa.field(n, pa.list_(value_type, d), nullable=False) for n, d in layout.layer_dims.items()]
    return pa.schema(fields, metadata={"fastfeat": layout.metadata_json})


def record_batch(schema: pa.Schema, rows: Rows) -> pa.RecordBatch:
    """One Arrow batch of ``rows`` in ``schema`` (feature columns as zero-copy fixed-size lists)."""
    columns = row_arrays(rows)
    for name in schema.names[len(ROW_COLUMNS) :]:
        values: np.ndarray = rows.features[name]
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


class _ParquetShardWriter(ShardWriter):
    def __init__(self, path: str, schema: pa.Schema):
        self.schema = schema
        self.rows = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0
        # No dictionary for the feature columns: float16 has only 65,536 values, so a dictionary always
        # fits and every value becomes a 16-bit index, no smaller on disk but 2-3x slower to decode
        # (benchmarks/data_loading.py); the label column, a few distinct strings, keeps one.
        self._writer = pq.ParquetWriter(
            path, schema, compression="zstd", write_statistics=["id"], use_dictionary=["id", "label"]
        )

    def add(self, rows: Rows) -> None:
        batch = record_batch(self.schema, rows)
        self._pending.append(batch)
        self._pending_bytes += batch.nbytes
        self.rows += batch.num_rows
        if self._pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending, self.schema), row_group_size=1 << 30)
            self._pending, self._pending_bytes = [], 0

    def close(self) -> int:
        self._flush()
        self._writer.close()
        return self.rows

    def abort(self) -> None:
        self._writer.close()


@register_sink
class ParquetSink(Sink):
    name = "parquet"
    description = "part-k.parquet: id, label, width, height and one fixed-size-list column per layer"

    def __init__(self, layout: Layout):
        super().__init__(layout)
        self.schema = feature_schema(layout)

    def shard_files(self, index: int) -> list[str]:
        return [f"part-{index:05d}.parquet"]

    def open(self, paths: dict[str, str]) -> ShardWriter:
        (path,) = paths.values()
        return _ParquetShardWriter(path, self.schema)

    def inspect(self, paths: dict[str, str]) -> tuple[int, list[str]]:
        (path,) = paths.values()
        pf = pq.ParquetFile(path)
        return pf.metadata.num_rows, pf.read(columns=["id"]).column(0).to_pylist()
