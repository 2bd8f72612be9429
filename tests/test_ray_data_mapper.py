"""fastfeat.ray_data.FeatureMapper called directly, outside Ray (fast: no cluster, no subprocess): the rows it
returns hold the features `fastfeat extract` stores for the same images, and a bad image is an error row."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
from helpers import column_matrix, fast_first, read_features

import fastfeat
from fastfeat.errors import ConfigError
from fastfeat.ray_data import FeatureMapper

OPTIONS = dict(model="caffenet", weights="random:4", layers="relu7", precision="fp32")


@pytest.mark.parametrize("decoder", fast_first([None, "torchvision"]))
def test_mapper_outside_ray_equals_extract(decoder, photos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = []
    for p in photos[:3]:
        names.append(os.path.basename(p))
        (src / names[-1]).write_bytes(open(p, "rb").read())
    fastfeat.extract(str(src), str(tmp_path / "out"), batch_size=2, progress=False, decoder=decoder, **OPTIONS)
    stored = read_features(str(tmp_path / "out"))
    by_id = dict(zip(stored.column("id").to_pylist(), column_matrix(stored, "relu7"), strict=True))

    mapper = FeatureMapper(batch_size=2, num_threads=1, decoder=decoder, **OPTIONS)
    images = [(src / n).read_bytes() for n in names] + [b"this is not an image"]
    out = mapper(pa.table({"name": [*names, "bad"], "image": images}))
    assert out.column_names == ["name", "relu7", "error"]
    errors = out.column("error").to_pylist()
    assert errors[:3] == [None] * 3 and errors[3] is not None
    got = np.stack(out.column("relu7").to_pylist()[:3]).astype(np.float32)
    want = np.stack([by_id[n] for n in names]).astype(np.float32)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3


def test_an_unknown_decoder_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="unknown --decoder 'pil'"):
        FeatureMapper(decoder="pil", **OPTIONS)
