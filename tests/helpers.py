"""Helpers shared by the tests: image encoding and reading a run's shards."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def jpeg_bytes(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def read_features(out: str):
    """All rows of a run's shards, in shard order, as a pyarrow Table."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(out, "part-*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files])


def column_matrix(table, name: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    return np.array(col.flatten().to_numpy(zero_copy_only=False)).reshape(len(table), -1)
