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


class torch_threads:
    """``with torch_threads(n):`` torch's intra-op thread count for the block.  A reference run for a Ray
    worker granted n CPUs needs the worker's count: on some CPUs (AVX2-only oneDNN) a conv's summation
    order, and so its last bits, depends on how many threads share it (docs/ray.md)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)


def fast_first(values, keep: int = 1, spread: bool = False) -> list:
    """Parametrize values of which the first ``keep`` run in the fast loop (``-m "not slow"``) and the
    rest are marked slow: the fast loop keeps one case of a family, the full suite runs them all.
    ``spread``: each value is a tuple of several argnames' values."""
    import pytest

    def param(v, *marks):
        return pytest.param(*(v if spread else (v,)), marks=marks)

    return [param(v) if i < keep else param(v, pytest.mark.slow) for i, v in enumerate(values)]


def cut_after_shards(out, n: int) -> None:
    """Make a finished output look like a run killed after its first ``n`` shards: the manifest lists only
    those (and is incomplete), and every later shard's files are gone."""
    import json
    import re

    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["shards"], manifest["complete"] = manifest["shards"][:n], False
    with open(path, "w") as f:
        json.dump(manifest, f)
    for name in os.listdir(out):
        shard = re.match(r"part-(\d{5,})\.", name)
        if shard and int(shard.group(1)) >= n:
            os.unlink(os.path.join(out, name))
