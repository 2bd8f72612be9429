"""``fastfeat serve`` stays honest when something other than an image fails: the app in this process (a
real Engine, caffenet with random weights on the CPU) with failures injected around the batcher's calls.

A failure outside the forward call fails that batch only (500) and the next request succeeds; a batching
thread that dies turns /healthz to 503 and every request into a 503 at once (none waits for it); a request
that gets no answer within --request-timeout is 503; a big binary response keeps its headers bounded."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from starlette.testclient import TestClient

from fastfeat.serve.app import create_app
from fastfeat.serve.batching import Batcher
from fastfeat.serve.codec import DETAIL_HEADER_LIMIT
from fastfeat.serve.config import ServeConfig, check_serve_config
from fastfeat.serve.engine import Engine
from fastfeat.serve.metrics import Metrics

WAIT_S = 120  # bound on every hold below


class Killed(BaseException):
    """Escapes the batcher's `except Exception`: the thread that raises it dies."""


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine():
    cfg = ServeConfig(weights="random:1", layers="relu7", device="cpu", precision="fp32", max_batch=4)
    return Engine(cfg, check_serve_config(cfg))


def _serve(engine, on_batch=None, forward=None, timeout_s: float = 60.0) -> TestClient:
    cfg = ServeConfig(weights="random:1", layers="relu7", device="cpu", precision="fp32", max_batch=4,
                      max_delay_ms=0, max_queue=64, request_timeout_s=timeout_s)  # fmt: skip
    batcher = Batcher(engine.decode, forward or engine.forward, cfg.max_batch, 0.0, cfg.queue_limit)
    metrics = Metrics(cfg.max_batch, lambda: batcher.waiting, lambda: batcher.admitted)
    batcher.on_batch = on_batch or metrics.on_batch
    return TestClient(create_app(cfg, engine, batcher, metrics, None), raise_server_exceptions=False)


def _post(client: TestClient, seed: int = 0, **params):
    return client.post("/v1/features", content=_jpeg(seed), headers={"content-type": "image/jpeg"}, params=params)


def test_a_failure_after_the_forward_fails_that_batch_only(engine):
    calls = []

    def on_batch(size, decode_s, forward_s):
        calls.append(size)
        if len(calls) == 1:
            raise RuntimeError("metrics backend exploded")

    with _serve(engine, on_batch=on_batch) as client:
        r = _post(client)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["kind"] == "server_failure" and "metrics backend exploded" in err["message"]
        ok = _post(client)
        assert ok.status_code == 200 and len(ok.json()["images"][0]["features"]["relu7"]) == 4096
        assert client.get("/healthz").json()["status"] == "ok" and calls == [1, 1]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_batching_thread_shows_in_healthz_and_fails_requests_at_once(engine):
    def on_batch(size, decode_s, forward_s):
        raise Killed("thread killed by the test")

    with _serve(engine, on_batch=on_batch) as client:
        assert client.get("/healthz").status_code == 200
        r = _post(client)  # its batch was in the thread that died: answered, not left waiting
        assert r.status_code == 500 and "thread killed by the test" in r.json()["error"]["message"]
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "failing"
        assert "forward thread stopped" in health.json()["reason"]
        after = _post(client)
        assert after.status_code == 503 and after.json()["error"]["kind"] == "batcher_dead"


def test_a_request_without_an_answer_in_time_is_503_and_the_server_goes_on(engine):
    release, held = threading.Event(), threading.Event()

    def forward(images, good):
        if not release.is_set():
            held.set()
            assert release.wait(WAIT_S)
        return engine.forward(images, good)

    with _serve(engine, forward=forward, timeout_s=0.5) as client:
        r = _post(client)  # the forward is held until after this answer: it can only time out
        assert held.is_set() and r.status_code == 503, r.text
        assert r.json()["error"]["kind"] == "timeout" and r.headers["retry-after"] == "1"
        release.set()
        assert _post(client).status_code == 200
        assert client.get("/healthz").json()["inflight_images"] == 0  # the timed-out image left the count


def test_a_big_binary_response_keeps_its_headers_bounded(engine):
    n = 40
    files = [("image", (f"image-with-a-long-name-{i:04d}.jpg", _jpeg(i))) for i in range(n)]
    files.append(("image", ("broken.jpg", b"\xff\xd8\xff" + b"x" * 100)))
    with _serve(engine) as client:
        small = client.post("/v1/features", files=files[:2], params={"format": "npy"})
        assert json.loads(small.headers["x-fastfeat-errors"]) == [] and small.headers["x-fastfeat-rows"] == "0-1"
        r = client.post("/v1/features", files=files, params={"format": "npy"})
        assert r.status_code == 200 and np.load(io.BytesIO(r.content)).shape == (n, 4096)
        assert sum(len(k) + len(v) for k, v in r.headers.items()) < DETAIL_HEADER_LIMIT + 1000
        assert "x-fastfeat-images" not in r.headers and "omitted" in r.headers["x-fastfeat-details"]
        assert r.headers["x-fastfeat-rows"] == f"0-{n - 1}"
        a = client.post("/v1/features", files=files, params={"format": "arrow"})
        table = pa.ipc.open_stream(a.content).read_all()
        images = json.loads(table.schema.metadata[b"fastfeat.images"])
        errors = json.loads(table.schema.metadata[b"fastfeat.errors"])
        assert [i["id"] for i in images] == table.column("id").to_pylist() and len(images) == n
        assert [e["id"] for e in errors] == ["broken.jpg"] and errors[0]["status"] in (415, 422)
