"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the tests' S3 server (tests/s3_server.py).

Point a client at :attr:`S3FaultProxy.endpoint_url` (``env`` holds the AWS_* variables for a subprocess)
and the proxy forwards every request to the real server, except those it is told to fail:

- ``fail_share``: that share of requests, drawn from a ``random.Random(seed)``, so a run's sequence of
  decisions is the same every time (which request gets which decision follows the order they arrive in);
- ``fail_first``: the first N requests of each key (the URL path; a multipart upload's parts count for
  their object's key);
- :meth:`down` / :meth:`up`: every request while the store is "down";
- ``always_fail``: every request for these keys (``bucket/key``), forever (a key the store never serves);
- :meth:`hold`: the first request matching a predicate is held, before it reaches the server, until the
  test releases it (forwarded) or drops it (connection reset).  ``Hold.reached`` is set once the request is
  held, so a test can act at that exact point (kill the client) without sleeping.

A failure is one of ``FAILURES``: ``"503"`` (S3's SlowDown answer with its XML error body), ``"reset"`` (the
connection closed with a TCP RST, nothing answered) or ``"stall"`` (the request read, then no answer for
``stall_s`` seconds, then a reset).  Everything is bounded: ``max_failures`` caps the injected failures,
a stall lasts ``stall_s``, a hold at most ``hold_timeout_s`` (then it resets).  :attr:`log` records
``(method, path, decision)`` of each request, in arrival order.

The tests' ``s3_endpoint`` (tests/s3_server.py) always reaches moto through one of these, as
``s3_endpoint.proxy``: with no faults configured it only forwards (and renames moto's
CompleteMultipartUpload answer, which pyarrow would take for an error, see :func:`_moto_compatible`).
A test that configures faults calls :meth:`reset` when done (``with s3_endpoint.faults() as proxy:``).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAILURES = ("503", "reset", "stall")
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY</RequestId><HostId>fault-proxy</HostId></Error>"
)
# Hop-by-hop headers, and those the proxy re-derives after it has read the whole body.
_NOT_FORWARDED = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclass
class Request:
    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]

    @property
    def key(self) -> str:
        """``bucket/key`` of a path-style request."""
        return self.path.lstrip("/")


@dataclass
class Hold:
    """A held request: ``reached`` is set once one matching request waits in the proxy."""

    match: Callable[[Request], bool]
    reached: threading.Event = field(default_factory=threading.Event)
    request: Request | None = None
    _released: threading.Event = field(default_factory=threading.Event)
    _drop: bool = False

    def release(self) -> None:
        """Forward the held request to the server."""
        self._released.set()

    def drop(self) -> None:
        """Answer the held request with a connection reset."""
        self._drop = True
        self._released.set()


class S3FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, seed: int = 0, env: dict[str, str] | None = None):
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.fail_share = 0.0
        self.fail_first = 0
        self.failure = "503"
        self.stall_s = 2.0
        self.hold_timeout_s = 300.0
        self.max_failures: int | None = None
        self.always_fail: frozenset[str] = frozenset()
        self._down = False
        self._holds: list[Hold] = []
        self._per_key: Counter[str] = Counter()
        self.failures = 0
        self.log: list[tuple[str, str, str]] = []
        self._stopping = threading.Event()
        proxy = self

        class Handler(_Handler):
            pass

        Handler.proxy = proxy
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.env = {**(env or {}), "AWS_ENDPOINT_URL": self.endpoint_url}
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    # -- life --------------------------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            for h in self._holds:
                h.drop()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- configuration (any time, from the test's thread) ------------------------------------------------
    def configure(
        self,
        fail_share: float | None = None,
        fail_first: int | None = None,
        failure: str | None = None,
        stall_s: float | None = None,
        max_failures: int | None = None,
        seed: int | None = None,
        always_fail: set[str] | None = None,
    ) -> None:
        if failure is not None and failure not in FAILURES:
            raise ValueError(f"failure must be one of {FAILURES}, got {failure!r}")
        if fail_share is not None and not 0.0 <= fail_share <= 1.0:
            raise ValueError(f"fail_share must be in [0, 1], got {fail_share}")
        with self._lock:
            if fail_share is not None:
                self.fail_share = fail_share
            if fail_first is not None:
                self.fail_first = fail_first
                self._per_key.clear()
            if failure is not None:
                self.failure = failure
            if stall_s is not None:
                self.stall_s = stall_s
            if max_failures is not None:
                self.max_failures = max_failures
            if seed is not None:
                self._rng = random.Random(seed)
            if always_fail is not None:
                self.always_fail = frozenset(always_fail)

    def reset(self) -> None:
        """No faults, no holds (held requests are dropped): a plain forwarding proxy again."""
        with self._lock:
            self.fail_share, self.fail_first, self.failure, self.max_failures = 0.0, 0, "503", None
            self.always_fail = frozenset()
            self._down = False
            self._per_key.clear()
            holds, self._holds = self._holds, []
        for h in holds:
            h.drop()

    def down(self, failure: str | None = None) -> None:
        """Fail every request (with ``failure``, default the configured one) until :meth:`up`."""
        self.configure(failure=failure)
        with self._lock:
            self._down = True

    def up(self) -> None:
        with self._lock:
            self._down = False

    def hold(self, match: Callable[[Request], bool]) -> Hold:
        """Hold the next request for which ``match(request)`` is true (once)."""
        h = Hold(match)
        with self._lock:
            self._holds.append(h)
        return h

    # -- per request -------------------------------------------------------------------------------------
    def _decide(self, req: Request) -> tuple[str, Hold | None]:
        """ "forward", "hold" or a failure kind; draws from the seeded generator for every request."""
        with self._lock:
            draw = self._rng.random()
            for h in self._holds:
                if h.match(req):
                    self._holds.remove(h)
                    h.request = req
                    self.log.append((req.method, req.path, "hold"))
                    return "hold", h
            self._per_key[req.key] += 1
            fail = self._down or self._per_key[req.key] <= self.fail_first or draw < self.fail_share
            if req.key in self.always_fail or (
                fail and (self.max_failures is None or self.failures < self.max_failures)
            ):
                self.failures += 1
                self.log.append((req.method, req.path, self.failure))
                return self.failure, None
            self.log.append((req.method, req.path, "forward"))
            return "forward", None


def _moto_compatible(payload: bytes) -> bytes:
    """moto (5.2) answers CompleteMultipartUpload with a ``CompleteMultipartUploadResponse`` root element where
    S3 answers ``CompleteMultipartUploadResult``; pyarrow 26 (aws-sdk-cpp) takes any other root for an error
    embedded in a 200 OK and fails every upload.  Renamed here, so uploads through the proxy complete."""
    if payload.startswith(b"<?xml") and b"<CompleteMultipartUploadResponse" in payload[:200]:
        return payload.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
    return payload


class _Handler(BaseHTTPRequestHandler):
    proxy: S3FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect; also answers "Expect: 100-continue"
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, *args) -> None:  # quiet: the test reads proxy.log
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        """Close the connection with a TCP RST: the client sees "connection reset by peer"."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.connection.close()

    def _handle(self) -> None:
        path, _, query = self.path.partition("?")
        req = Request(self.command, path, query, {k.lower(): v for k, v in self.headers.items()})
        body = self._body()
        decision, held = self.proxy._decide(req)
        if decision == "hold":
            held.reached.set()
            if not held._released.wait(self.proxy.hold_timeout_s) or held._drop:
                return self._reset()
        elif decision == "503":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOW_DOWN)
            return
        elif decision == "reset":
            return self._reset()
        elif decision == "stall":
            self.proxy._stopping.wait(self.proxy.stall_s)
            return self._reset()
        self._forward(body)

    def _forward(self, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED}
        headers["Content-Length"] = str(len(body))
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
        try:
            self._upstream.request(self.command, self.path, body=body, headers=headers)
            resp = self._upstream.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            self._upstream.close()
            self._upstream = None
            return self._reset()
        payload = _moto_compatible(payload)
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _NOT_FORWARDED and k.lower() != "content-length":
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def finish(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
        try:
            super().finish()
        except OSError:
            pass

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
