"""The fault-injecting proxy itself (tests/s3_fault_proxy.py), in front of a tiny in-process object
server (PUT stores a body, GET returns it): fast, no moto.  The object-storage tests use the same proxy
in front of moto."""

from __future__ import annotations

import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from s3_fault_proxy import SLOW_DOWN, S3FaultProxy


class _Store(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    objects: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def do_PUT(self) -> None:
        self.objects[self.path] = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        body = self.objects.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture
def store():
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Store", (_Store,), {"objects": {}}))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(store):
    with S3FaultProxy(*store.server_address[:2], seed=7) as p:
        yield p


def _request(proxy: S3FaultProxy, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body); raises on a reset."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_forwards_requests_unchanged(proxy, store):
    assert _request(proxy, "PUT", "/bucket/a", b"hello") == (200, b"")
    assert store.RequestHandlerClass.objects["/bucket/a"] == b"hello"
    assert _request(proxy, "GET", "/bucket/a") == (200, b"hello")
    assert _request(proxy, "GET", "/bucket/missing")[0] == 404
    # keep-alive: several requests on one connection
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    for _ in range(3):
        conn.request("GET", "/bucket/a")
        assert conn.getresponse().read() == b"hello"
    conn.close()


def test_first_n_requests_of_each_key_fail_with_slow_down(proxy):
    proxy.configure(fail_first=2)
    for key in ("/bucket/a", "/bucket/b"):
        assert _request(proxy, "PUT", key, b"x") == (503, SLOW_DOWN)
        assert _request(proxy, "PUT", key, b"x") == (503, SLOW_DOWN)
        assert _request(proxy, "PUT", key, b"x")[0] == 200
        assert _request(proxy, "GET", key) == (200, b"x")
    assert b"<Code>SlowDown</Code>" in SLOW_DOWN and proxy.failures == 4


def test_a_share_of_requests_fails_the_same_way_for_the_same_seed(store):
    def decisions(seed: int) -> list[str]:
        with S3FaultProxy(*store.server_address[:2], seed=seed) as p:
            p.configure(fail_share=0.3)
            return [str(_request(p, "GET", f"/bucket/k{i}")[0]) for i in range(40)]

    first = decisions(7)
    rng = random.Random(7)  # the proxy draws once per request from Random(seed)
    assert first == ["503" if rng.random() < 0.3 else "404" for _ in range(40)]
    assert decisions(7) == first and decisions(8) != first and 0 < first.count("503") < 40


def test_reset_and_stall_fail_the_request_and_the_proxy_goes_on(proxy):
    proxy.configure(fail_first=1, failure="reset")
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        _request(proxy, "GET", "/bucket/r")
    assert _request(proxy, "GET", "/bucket/r")[0] == 404
    proxy.configure(fail_first=1, failure="stall", stall_s=0.05)
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        _request(proxy, "GET", "/bucket/s")
    assert _request(proxy, "GET", "/bucket/s")[0] == 404
    assert [d for _, _, d in proxy.log] == ["reset", "forward", "stall", "forward"]


def test_store_down_fails_everything_until_up_and_failures_are_bounded(proxy):
    proxy.down()
    assert [_request(proxy, "GET", f"/bucket/{i}")[0] for i in range(3)] == [503, 503, 503]
    proxy.up()
    assert _request(proxy, "GET", "/bucket/0")[0] == 404
    proxy.configure(fail_share=1.0, max_failures=proxy.failures + 2)
    assert [_request(proxy, "GET", "/bucket/x")[0] for _ in range(4)] == [503, 503, 404, 404]
    with pytest.raises(ValueError, match="failure must be one of"):
        proxy.configure(failure="teapot")


def test_a_held_request_waits_until_released_or_dropped(proxy, store):
    hold = proxy.hold(lambda r: r.method == "PUT" and r.key == "bucket/held")
    results = []
    put = threading.Thread(target=lambda: results.append(_request(proxy, "PUT", "/bucket/held", b"data")))
    put.start()
    assert hold.reached.wait(30) and hold.request.method == "PUT"
    assert "/bucket/held" not in store.RequestHandlerClass.objects  # held before it reached the server
    assert _request(proxy, "PUT", "/bucket/other", b"o")[0] == 200  # others pass meanwhile
    hold.release()
    put.join(30)
    assert results == [(200, b"")] and store.RequestHandlerClass.objects["/bucket/held"] == b"data"

    dropped = proxy.hold(lambda r: r.key == "bucket/dropped")
    errors = []

    def get():
        try:
            _request(proxy, "GET", "/bucket/dropped")
        except (ConnectionError, http.client.RemoteDisconnected) as exc:
            errors.append(exc)

    thread = threading.Thread(target=get)
    thread.start()
    assert dropped.reached.wait(30)
    dropped.drop()
    thread.join(30)
    assert len(errors) == 1
