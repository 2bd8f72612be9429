"""A torchvision model downstream of the forward pass, as the built-in networks are tested there: ``--append``
(tests/test_outcomes.py), an output on object storage (tests/test_object_storage.py, moto's S3 server) and
``serve --index`` (tests/test_serve_index.py).  torchvision:resnet18 at random weights on a few real
photos; every test runs whole extracts of a ResNet (seconds each on the 2-core box): slow."""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
from helpers import column_matrix, read_features
from PIL import Image

import fastfeat
from fastfeat.errors import ConfigError

pytestmark = pytest.mark.slow

MODEL = "torchvision:resnet18"
KW = dict(model=MODEL, weights="random:2", layers="layer3,flatten", batch_size=2, shard_size=2, progress=False)


@pytest.fixture
def three_photos(photos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in [p for p in photos if p.endswith(".jpg")][:3]:
        shutil.copy(p, src)
    return src


def test_append_with_a_torchvision_model_equals_a_clean_run(three_photos, photos, tmp_path):
    src, out = three_photos, str(tmp_path / "out")
    first = fastfeat.extract(str(src), out, **KW)
    Image.open(photos[0]).convert("RGB").save(src / "zz_new.jpg")
    Image.open(photos[1]).convert("RGB").save(src / "aa_new.jpg")
    with pytest.raises(ValueError, match=r"2 added, 0 removed.*--append"):
        fastfeat.extract(str(src), out, **KW)
    s = fastfeat.extract(str(src), out, append=True, **KW)
    assert s["processed"] == 2 and s["rows_written"] == 2 and s["complete"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [g["items"] for g in manifest["generations"]] == [first["images"], 2]
    assert fastfeat.output.verify(out) == []
    # Another --pool is another run: appending with it is refused, not mixed in.
    with pytest.raises(ValueError, match="different run .*pool: avg → max"):
        fastfeat.extract(str(src), out, append=True, **{**KW, "pool": "max"})
    clean = str(tmp_path / "clean")
    fastfeat.extract(str(src), clean, **KW)
    a, b = read_features(out), read_features(clean)
    ids = a.column("id").to_pylist()
    assert sorted(ids) == sorted(b.column("id").to_pylist()) and len(ids) == first["images"] + 2
    order = [b.column("id").to_pylist().index(i) for i in ids]
    for layer in ("layer3", "flatten"):
        assert np.array_equal(column_matrix(a, layer), column_matrix(b, layer)[order]), layer


def test_a_torchvision_model_to_object_storage_equals_a_local_run(three_photos, s3_endpoint, tmp_path):
    from fastfeat import data, storage
    from fastfeat.cli import main

    local = str(tmp_path / "local")
    fastfeat.extract(str(three_photos), local, **KW)
    out = s3_endpoint.uri(s3_endpoint.prefix(), "out")
    summary = fastfeat.extract(str(three_photos), out, **KW)
    assert summary["complete"] and summary["out"] == out

    def shards(location: str) -> list[tuple]:
        manifest = json.loads(storage.read_bytes(storage.join(location, "manifest.json")))
        return [(r["file"], r["rows"], r["sha256"]) for r in manifest["shards"]]

    assert shards(out) == shards(local)  # the same shard files, byte for byte
    assert main(["verify", out]) == 0
    for layer in ("layer3", "flatten"):
        got, want = data.load(out, layer), data.load(local, layer)
        assert got[0] == want[0] and np.array_equal(got[2], want[2]), layer
    meta = json.loads(storage.read_bytes(storage.join(out, "manifest.json")))["config"]["metadata"]
    assert meta["model_config"]["architecture"] == "resnet18" and meta["model_config"]["pool"] == "avg"
    assert fastfeat.extract(str(three_photos), out, **KW)["up_to_date"]


def test_serve_index_of_a_torchvision_model_finds_each_image(three_photos, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fastfeat.serve.app import create_app
    from fastfeat.serve.batching import Batcher
    from fastfeat.serve.config import ServeConfig, check_serve_config
    from fastfeat.serve.engine import Engine
    from fastfeat.serve.index import load_index
    from fastfeat.serve.metrics import Metrics

    out = str(tmp_path / "index")
    run = dict(model=MODEL, weights="random:3", layers="layer4,flatten", precision="fp32")
    fastfeat.extract(str(three_photos), out, batch_size=2, shard_size=2, format="npy", progress=False, **run)

    cfg = ServeConfig(**run, device="cpu", max_batch=2, index=out)
    engine = Engine(cfg, check_serve_config(cfg))
    index = load_index(out, engine.metadata, None, exact_below=1000)
    assert index.layer == "flatten" and len(index) == 3  # the deepest layer both hold
    # The same layers under another --pool are other features: refused by name.
    other = copy.deepcopy(engine.metadata)
    other["model_config"]["pool"] = "max"
    with pytest.raises(ConfigError, match="pooled with --pool avg; the server pools with --pool max"):
        load_index(out, other, None, exact_below=1000)
    batcher = Batcher(engine.decode, engine.forward, cfg.max_batch, cfg.max_delay_ms / 1000, cfg.queue_limit)
    metrics = Metrics(cfg.max_batch, lambda: batcher.waiting, lambda: batcher.admitted)
    with TestClient(create_app(cfg, engine, batcher, metrics, index)) as client:
        for name in sorted(os.listdir(three_photos)):
            r = client.post("/v1/neighbors", content=(three_photos / name).read_bytes(), params={"id": name, "k": 3},
                            headers={"Content-Type": "image/jpeg"})  # fmt: skip
            assert r.status_code == 200, r.text
            (image,) = r.json()["images"]
            best = image["neighbors"][0]
            assert best["id"] == name and best["score"] > 0.9999, image["neighbors"]
            assert len(image["neighbors"]) == 3
