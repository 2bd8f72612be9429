"""``fastfeat serve``: a real server process on 127.0.0.1 and a real HTTP client.

Features against ``fastfeat extract``'s on the same images (bit-identical in the same batch, within
the measured batch-composition tolerance otherwise), every response format, every refusal, the
token, the metrics, nearest neighbours and thumbnails, and the page in headless Chromium.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from serve_helpers import ServerProcess, extract_rows, metric, rel_err, stopped_cleanly

import fastfeat
from fastfeat.caveats import RANDOM_WEIGHTS_NOTE

pytestmark = pytest.mark.slow  # a `fastfeat serve` subprocess

TOKEN = "test-token-7f3a"
MODEL, WEIGHTS, LAYERS = "alexnet", "random:5", ["relu6", "relu7"]
# ||served - extracted|| / ||extracted|| per image when the batch company differs (oneDNN plans per
# batch size and sums in another order). Measured by benchmarks/serve_equality.py on 64 photos:
# fp32 max 6.2e-7, bf16 max 7.6e-4 (benchmarks/results/serve_equality_cpu.json); a 6-16x margin.
TOL = {"fp32": 1e-5, "bf16": 5e-3}
MAX_BODY_MB = 8


def _ids(root: str) -> list[str]:
    return sorted((os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs), key=str.encode)


def _extract(source: str, out: str, precision: str) -> dict[str, dict[str, np.ndarray]]:
    fastfeat.extract(source, out, model=MODEL, weights=WEIGHTS, layers=LAYERS, batch_size=4, device="cpu",
                     precision=precision, dtype="float32", format="npy", progress=False)  # fmt: skip
    return {layer: extract_rows(out, layer) for layer in LAYERS}


@pytest.fixture(scope="module")
def extracted(dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serve") / "feats")
    return out, _extract(dataset, out, "fp32")


@pytest.fixture(scope="module")
def server(extracted):
    out, _ = extracted
    proc = ServerProcess(
        "--model", MODEL, "--weights", WEIGHTS, "--layers", ",".join(LAYERS), "--precision", "fp32",
        "--device", "cpu", "--max-batch", "8", "--max-delay-ms", "50", "--index", out, "--token", TOKEN,
        "--max-body-mb", str(MAX_BODY_MB),
    )  # fmt: skip
    yield proc
    assert stopped_cleanly(proc), "".join(proc.stderr)[-2000:]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


def _post_one(client, path: str, data: bytes, id_: str, **params) -> httpx.Response:
    return client.post(path, content=data, params={"id": id_, **params}, headers={"Content-Type": "image/jpeg"})


def _post_many(client, path: str, images: list[tuple[str, bytes]], **params) -> httpx.Response:
    return client.post(path, files=[("image", (i, d)) for i, d in images], params=params)


def _read(dataset: str, id_: str) -> bytes:
    return open(os.path.join(dataset, id_), "rb").read()


def _check_within(images: list[dict], ref: dict, tol: float) -> float:
    worst = 0.0
    for im in images:
        for layer in LAYERS:
            worst = max(worst, rel_err(im["features"][layer], ref[layer][im["id"]]))
    assert worst <= tol
    return worst


# -- correctness ----------------------------------------------------------------------------------
def test_model_metadata_is_a_shards_metadata(client, extracted):
    out, _ = extracted
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    shard_meta = json.loads(pq.read_schema(os.path.join(out, manifest["shards"][0]["file"])).metadata[b"fastfeat"])
    r = client.get("/v1/model")
    assert r.status_code == 200 and r.json() == {**shard_meta, "warning": RANDOM_WEIGHTS_NOTE}  # random:SEED


def test_random_weights_are_flagged_at_start_up(server):
    """One line after the listening line (and /v1/model's "warning", above): these features are not for use."""
    assert server.lines.get(timeout=30).strip() == f"fastfeat serve: warning: {RANDOM_WEIGHTS_NOTE}"


def test_same_batch_as_extract_is_bit_identical(client, dataset, extracted):
    """Extract's first batch (items 0-3, batch size 4) sent as one request: the same batch, the same bits."""
    _, ref = extracted
    first = _ids(dataset)[:4]
    r = _post_many(client, "/v1/features", [(i, _read(dataset, i)) for i in first])
    assert r.status_code == 200
    images = r.json()["images"]
    assert [im["id"] for im in images] == first and {im["batch_size"] for im in images} == {4}
    for im in images:
        for layer in LAYERS:
            assert np.array_equal(np.asarray(im["features"][layer], np.float32), ref[layer][im["id"]])


def test_alone_and_concurrent_within_tolerance(client, dataset, extracted):
    _, ref = extracted
    ids = _ids(dataset)
    alone = [_post_one(client, "/v1/features", _read(dataset, i), i).json()["images"][0] for i in ids]
    assert [im["width"] for im in alone] == [Image.open(os.path.join(dataset, i)).size[0] for i in ids]
    _check_within(alone, ref, TOL["fp32"])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: _post_one(client, "/v1/features", _read(dataset, i), i), ids[:8]))
    images = [r.json()["images"][0] for r in together]
    _check_within(images, ref, TOL["fp32"])
    # Eight concurrent requests did not make eight forward passes: they were coalesced.
    assert max(im["batch_size"] for im in images) > 1


def test_npy_and_arrow_bodies(client, dataset, extracted):
    _, ref = extracted
    ids = _ids(dataset)[4:7]
    images = [(i, _read(dataset, i)) for i in ids]
    as_json = _post_many(client, "/v1/features", images).json()["images"]
    r = _post_many(client, "/v1/features", images, format="npy")
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    rows = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert rows.shape == (3, 8192) and rows.dtype == np.float32
    assert r.headers["x-fastfeat-layers"] == "relu6:4096,relu7:4096"
    heads = json.loads(r.headers["x-fastfeat-images"])
    assert [h["id"] for h in heads] == ids and json.loads(r.headers["x-fastfeat-errors"]) == []
    for row, im in zip(rows, as_json, strict=True):  # the same request composition: the same bits as JSON
        assert np.array_equal(row, np.concatenate([np.asarray(im["features"][n], np.float32) for n in LAYERS]))
    for row, i in zip(rows, ids, strict=True):
        assert rel_err(row[4096:], ref["relu7"][i]) <= TOL["fp32"]

    r = _post_many(client, "/v1/features", images, format="arrow", dtype="float16", layers="relu7")
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.apache.arrow.stream"
    table = pa.ipc.open_stream(r.content).read_all()
    assert table.column_names == ["id", "label", "width", "height", "relu7"]
    assert table.schema.field("relu7").type == pa.list_(pa.float16(), 4096)
    meta = json.loads(table.schema.metadata[b"fastfeat"])
    assert meta["dtype"] == "float16" and list(meta["layers"]) == ["relu7"] and meta["model"] == MODEL
    assert table.column("id").to_pylist() == ids
    values = np.asarray(table.column("relu7").combine_chunks().flatten()).reshape(3, 4096)
    # float16 is cast from the same float32 row, as extract casts (round to nearest even).
    assert np.array_equal(values, rows[:, 4096:].astype(np.float16))


def test_one_bad_image_never_fails_its_neighbours(client, dataset, extracted):
    _, ref = extracted
    good = _ids(dataset)[:2]
    jpg = open(os.path.join(dataset, next(i for i in _ids(dataset) if i.endswith(".jpg"))), "rb").read()
    batch = [(good[0], _read(dataset, good[0])), ("truncated.jpg", jpg[: len(jpg) // 3]),
             ("text.jpg", b"not an image\n" * 30), (good[1], _read(dataset, good[1]))]  # fmt: skip
    r = _post_many(client, "/v1/features", batch)
    assert r.status_code == 200
    images = r.json()["images"]
    assert [im["id"] for im in images] == [good[0], "truncated.jpg", "text.jpg", good[1]]
    assert images[1]["status"] == 422 and images[1]["kind"] == "decode_failed"
    assert images[2]["status"] == 415 and images[2]["kind"] == "not_image"
    assert images[0]["batch_size"] == 3  # the truncated JPEG rode in the same forward pass
    _check_within([images[0], images[3]], ref, TOL["fp32"])


# -- refusals -------------------------------------------------------------------------------------
def _png_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header claims width x height: enough for the header check, nothing to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + (chunk(b"IDAT", idat) if idat else b"") + chunk(b"IEND", b"")


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 60, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("body", "content_type", "status", "kind", "reason"),
    [
        (b"hello", "text/plain", 415, "not_image", "is not an image"),
        (b"\x00\x01garbage" * 50, "application/octet-stream", 415, "not_image", "not a recognised image format"),
        (_png_header(20_000, 20_000), "image/png", 422, "too_many_pixels", "image too large"),
        (_png(20_000, 2), "image/png", 422, "aspect_ratio", "aspect ratio too extreme"),
        (b"", "image/jpeg", 400, "no_image", "empty"),
    ],
    ids=["text", "garbage", "bomb", "aspect", "empty"],
)
def test_bad_input_is_refused_with_its_reason(client, body, content_type, status, kind, reason):
    r = client.post("/v1/features", content=body, headers={"Content-Type": content_type})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["kind"] == kind and reason in error["message"] and error["status"] == status
    assert client.get("/healthz").status_code == 200


def test_undecodable_image_is_422(client, dataset):
    jpg = open(os.path.join(dataset, next(i for i in _ids(dataset) if i.endswith(".jpg"))), "rb").read()
    r = _post_one(client, "/v1/features", jpg[: len(jpg) // 3], "cut.jpg")
    assert r.status_code == 422 and r.json()["error"]["kind"] == "decode_failed"


def test_oversized_body_is_413(client, server):
    r = client.post("/v1/features", content=b"\xff" * ((MAX_BODY_MB << 20) + 1), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413 and r.json()["error"]["kind"] == "body_too_large"
    # Refused from Content-Length alone: the server answers before a byte of the body is sent.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(f"POST /v1/features HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Type: image/jpeg\r\nContent-Length: {10 << 30}\r\n\r\n".encode())  # fmt: skip
        assert s.recv(4096).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize(
    ("params", "kind"),
    [
        ({"layers": "fc8"}, "bad_layer"),
        ({"layers": "nope"}, "bad_layer"),
        ({"format": "xml"}, "bad_format"),
        ({"dtype": "int8"}, "bad_dtype"),
    ],  # fmt: skip
)
def test_bad_query_is_400(client, dataset, params, kind):
    r = _post_one(client, "/v1/features", _read(dataset, _ids(dataset)[0]), "x", **params)
    assert r.status_code == 400 and r.json()["error"]["kind"] == kind


def test_token_is_required(server, client):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for path in ("/v1/model", "/metrics", "/v1/index"):
            r = anonymous.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert anonymous.post("/v1/features", content=b"x").status_code == 401
        r = anonymous.get("/v1/model", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["kind"] == "unauthorized"
        assert anonymous.get("/healthz").status_code == 200  # liveness and the page need no token
        assert anonymous.get("/").status_code == 200 and "fastfeat serve" in anonymous.get("/").text
        assert "/v1/features" in anonymous.get("/openapi.json").json()["paths"]


def test_metrics_move(client, dataset):
    before = client.get("/metrics").text
    _post_one(client, "/v1/features", _read(dataset, _ids(dataset)[0]), "a")
    client.post("/v1/features", content=b"hello", headers={"Content-Type": "text/plain"})
    after = client.get("/metrics").text
    ok = {"endpoint": "/v1/features", "status": "200"}
    assert metric(after, "fastfeat_requests_total", **ok) == metric(before, "fastfeat_requests_total", **ok) + 1
    assert metric(after, "fastfeat_images_total", outcome="ok") == metric(before, "fastfeat_images_total", outcome="ok") + 1  # fmt: skip
    assert metric(after, "fastfeat_errors_total", kind="not_image") == metric(before, "fastfeat_errors_total", kind="not_image") + 1  # fmt: skip
    assert metric(after, "fastfeat_batch_size_count") == metric(before, "fastfeat_batch_size_count") + 1
    assert metric(after, "fastfeat_request_seconds_count", endpoint="/v1/features") == metric(before, "fastfeat_request_seconds_count", endpoint="/v1/features") + 2  # fmt: skip
    assert "fastfeat_inflight_images 0.0" in after and "fastfeat_queue_images 0.0" in after


# -- nearest neighbours ---------------------------------------------------------------------------
def test_neighbors_find_the_image_itself(client, dataset, extracted):
    ids = _ids(dataset)
    info = client.get("/v1/index").json()
    assert info["rows"] == len(ids) and info["layer"] == "relu7" and info["search"].startswith("exact")
    r = _post_many(client, "/v1/neighbors", [(i, _read(dataset, i)) for i in ids[:3]], k=5)
    assert r.status_code == 200
    for im, i in zip(r.json()["images"], ids[:3], strict=True):
        hits = im["neighbors"]
        # The image itself at cosine 1 (cat/alpha.png is astronaut.png with an alpha channel: a tie).
        assert len(hits) == 5 and i in [h["id"] for h in hits if h["score"] > 0.9999]
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert next(h["label"] for h in hits if h["id"] == i) == (i.split("/")[0] if "/" in i else None)
    thumb = client.get("/v1/thumbnail", params={"id": ids[0], "size": 64})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 64
    assert client.get("/v1/thumbnail", params={"id": "../../etc/passwd"}).status_code == 404
    assert client.post("/v1/neighbors", params={"k": 0}, content=b"x").status_code == 400


def test_bf16_within_tolerance(dataset, tmp_path):
    ids = _ids(dataset)[:6]
    source = tmp_path / "src"
    for i in ids:
        (source / os.path.dirname(i)).mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(dataset, i), source / i)
    ref = _extract(str(source), str(tmp_path / "out"), "bf16")
    proc = ServerProcess("--model", MODEL, "--weights", WEIGHTS, "--layers", ",".join(LAYERS), "--precision",
                         "bf16", "--device", "cpu", "--max-batch", "4", "--max-delay-ms", "1")  # fmt: skip
    try:
        with httpx.Client(base_url=proc.url, timeout=120) as c:
            assert c.get("/v1/model").json()["precision"] == "bf16"
            alone = [_post_one(c, "/v1/features", _read(dataset, i), i).json()["images"][0] for i in ids]
            same = _post_many(c, "/v1/features", [(i, _read(dataset, i)) for i in ids[:4]]).json()["images"]
    finally:
        proc.stop()
    _check_within(alone, ref, TOL["bf16"])
    for im in same:  # extract's first batch again: bit-identical in bf16 too
        assert np.array_equal(np.asarray(im["features"]["relu7"], np.float32), ref["relu7"][im["id"]])


# -- the command line -----------------------------------------------------------------------------
def _serve_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fastfeat", "serve", "--port", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "random:0", "--max-batch", "0"], "--max-batch must be >= 1"),
        (["--weights", "random:0", "--max-batch", "8", "--max-queue", "4"], "--max-queue (4) must be >= --max-batch"),
        (["--weights", "random:0", "--index", "/nonexistent"], "no manifest.json"),
        (["--weights", "random:0", "--layers", "relu9"], "unknown layer 'relu9'"),
        (["--weights", "random:0", "--host", "example.com"], "--host must be an IP address"),
        (["--model", "alexnet", "--weights", "random:0", "--index", "{out}"], "other weights"),
        (["--model", "caffenet", "--weights", "random:5", "--index", "{out}"], "holds alexnet features"),
    ],
)
def test_bad_arguments_one_line_exit_2(extracted, args, message):
    out, _ = extracted
    r = _serve_cli(*[a.format(out=out) for a in args])
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("fastfeat: error:") and message in r.stderr


def test_port_in_use_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = _serve_cli("--weights", "random:0", "--port", str(taken.getsockname()[1]))
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr


# -- the page in a real browser -------------------------------------------------------------------
def test_page_in_headless_chromium(server, dataset, tmp_path):
    """Upload an image through the page; its activations, top units and neighbours (with thumbnails) appear."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium/chromedriver not installed (.ci/run installs Debian's)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1100"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server.url + "/")
        driver.execute_script("sessionStorage.setItem('fastfeat-token', arguments[0])", TOKEN)
        driver.refresh()
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#layer option"))
        wait.until(lambda d: "images" in d.find_element(By.ID, "index-facts").text)
        upload = "cat/" + next(f for f in sorted(os.listdir(os.path.join(dataset, "cat"))) if f.startswith("gen"))
        picker = driver.find_element(By.ID, "file")
        driver.execute_script("arguments[0].hidden = false", picker)  # WebDriver types only into a visible input
        picker.send_keys(os.path.join(dataset, upload))
        driver.execute_script("arguments[0].hidden = true", picker)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#top-units li")) == 10)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbors li.neighbor")) == 8)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#neighbors img')].every(i => i.complete && i.naturalWidth > 0)"))  # fmt: skip
        first = driver.find_elements(By.CSS_SELECTOR, "#neighbors li.neighbor")[0].text
        assert os.path.basename(upload) in first and "1.000" in first  # the image itself, cosine 1
        assert "ms round trip" in driver.find_element(By.ID, "status").text
        assert "4,096 units" in driver.find_element(By.ID, "stats").text
        colours = driver.execute_script(
            "const c = document.getElementById('activations'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "const s = new Set(); for (let i = 0; i < d.length; i += 4) s.add(d[i] << 16 | d[i+1] << 8 | d[i+2]); return s.size;"
        )  # fmt: skip
        assert colours > 50  # a heat map of 4,096 values, not a blank canvas
        time.sleep(0.3)  # let the last thumbnail paint before the picture is taken
        shot = tmp_path / "serve_page.png"
        size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]  # the whole page, not the window
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        png = driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
        )
        shot.write_bytes(base64.b64decode(png["data"]))
        if keep := os.environ.get("FASTFEAT_SERVE_SCREENSHOT"):
            shutil.copy(shot, keep)
    finally:
        driver.quit()
