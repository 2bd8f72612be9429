"""`fastfeat serve`'s app in this process (fast: no server subprocess, no socket), assembled as
fastfeat.serve.server.serve assembles it: one image's features equal extract's, the metrics count it, a
port in use is a one-line error."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import column_matrix, fast_first, read_features

import fastfeat
from fastfeat.errors import ConfigError
from fastfeat.serve.app import create_app
from fastfeat.serve.batching import Batcher
from fastfeat.serve.config import ServeConfig, check_serve_config
from fastfeat.serve.engine import Engine
from fastfeat.serve.metrics import Metrics
from fastfeat.serve.server import _bind


@pytest.mark.parametrize("decoder", fast_first([None, "torchvision"]))
def test_one_image_through_the_app_equals_extract(decoder, photos, tmp_path):
    photo = next(p for p in photos if p.endswith(".jpg"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(open(photo, "rb").read())
    run = dict(model="caffenet", weights="random:4", layers="relu7", precision="fp32", decoder=decoder)
    fastfeat.extract(str(src), str(tmp_path / "out"), batch_size=1, dtype="float32", progress=False, **run)
    want = column_matrix(read_features(str(tmp_path / "out")), "relu7")[0].astype(np.float32)

    cfg = ServeConfig(**run, device="cpu", max_batch=2)
    engine = Engine(cfg, check_serve_config(cfg))
    meta = read_features(str(tmp_path / "out")).schema.metadata[b"fastfeat"].decode()
    assert engine.metadata["preprocessing"]["decoder"] in meta  # what decoded the images, named as extract names it
    batcher = Batcher(engine.decode, engine.forward, cfg.max_batch, cfg.max_delay_ms / 1000, cfg.queue_limit)
    metrics = Metrics(cfg.max_batch, lambda: batcher.waiting, lambda: batcher.admitted)
    batcher.on_batch = metrics.on_batch
    with TestClient(create_app(cfg, engine, batcher, metrics, None)) as client:
        r = client.post("/v1/features", content=(src / "a.jpg").read_bytes(), params={"id": "a.jpg"},
                        headers={"Content-Type": "image/jpeg"})  # fmt: skip
        assert r.status_code == 200, r.text
        (image,) = r.json()["images"]
        got = np.asarray(image["features"]["relu7"], np.float32)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
        assert client.get("/healthz").status_code == 200
        assert "fastfeat_" in client.get("/metrics").text


def test_an_unknown_decoder_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="unknown --decoder 'pil'"):
        check_serve_config(ServeConfig(weights="random:0", decoder="pil"))


def test_a_port_in_use_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(Exception, match=f"cannot listen on 127.0.0.1:{port}: ") as err:
            _bind("127.0.0.1", port)
    assert "\n" not in str(err.value) and os.linesep not in str(err.value)
