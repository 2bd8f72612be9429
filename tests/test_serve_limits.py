"""``fastfeat serve`` under overload: a full queue answers 429 with Retry-After, and a client that goes
away frees its slot (its images never reach the decoder).  A real server on 127.0.0.1, one image per
forward pass, so that a 16-image request keeps it busy long enough to be observed."""

from __future__ import annotations

import concurrent.futures
import io
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import ServerProcess, metric, stopped_cleanly

pytestmark = pytest.mark.slow  # a `fastfeat serve` subprocess

QUEUE = 17  # one 16-image request fills all but one slot
WAIT_S = 60  # bound on every poll below


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess("--model", "alexnet", "--weights", "random:1", "--layers", "relu7", "--device", "cpu",
                         "--precision", "fp32", "--max-batch", "1", "--max-delay-ms", "0", "--max-queue", str(QUEUE))  # fmt: skip
    yield proc
    assert stopped_cleanly(proc), "".join(proc.stderr)[-2000:]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        time.sleep(0.005)


def _admitted(client) -> float:
    return metric(client.get("/metrics").text, "fastfeat_admitted_images_total")


def _busy(client, n: int) -> tuple[threading.Thread, list]:
    """Post an n-image request in the background; returns once the server has admitted it."""
    result, before = [], _admitted(client)
    files = [("image", (f"busy{i}.jpg", _jpeg(i))) for i in range(n)]
    t = threading.Thread(target=lambda: result.append(client.post("/v1/features", files=files)))
    t.start()
    _until(lambda: _admitted(client) == before + n, f"{n} images admitted")
    return t, result


def test_full_queue_answers_429_with_retry_after(client):
    # 16 of the 17 slots taken, released one image (one forward pass) at a time; requests of 8 images
    # are refused until 7 of the 16 have run, and these 8 clients all ask at once, right away.
    busy, result = _busy(client, QUEUE - 1)
    flood = [("image", (f"f{i}.jpg", _jpeg(100 + i))) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/features", files=flood), range(8)))
    for r in answers:
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["kind"] == "queue_full"
    busy.join(timeout=WAIT_S)
    assert result[0].status_code == 200 and len(result[0].json()["images"]) == QUEUE - 1
    # The queue drained: the same request is admitted now, and the server never stopped answering.
    assert client.post("/v1/features", files=flood).status_code == 200
    assert metric(client.get("/metrics").text, "fastfeat_errors_total", kind="queue_full") == 8


def test_client_that_disconnects_frees_its_slot(client, server):
    batches_before = metric(client.get("/metrics").text, "fastfeat_batch_size_count")
    busy, result = _busy(client, QUEUE - 1)
    before = _admitted(client)
    body = _jpeg(7)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/features HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        _until(lambda: _admitted(client) == before + 1, "its image admitted")  # queued behind the 16
    _until(lambda: metric(client.get("/metrics").text, "fastfeat_errors_total", kind="client_gone") == 1,
           "the disconnect noticed")  # fmt: skip
    # Its slot was freed with it (nothing of it stays admitted): a one-image request is admitted.
    assert client.post("/v1/features", content=_jpeg(8), headers={"Content-Type": "image/jpeg"}).status_code == 200
    busy.join(timeout=WAIT_S)
    assert result[0].status_code == 200
    # Its image was never decoded nor run: the 16 busy images and the one after it, nothing more.
    text = client.get("/metrics").text
    assert metric(text, "fastfeat_batch_size_count") == batches_before + QUEUE - 1 + 1
    assert metric(text, "fastfeat_requests_total", endpoint="/v1/features", status="499") == 1
