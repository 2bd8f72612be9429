"""The HTTP API of ``fastfeat serve`` (FastAPI): routes, the bearer-token check and request metrics.

Every refusal is a JSON body ``{"error": {"status", "kind", "message"}}``; the OpenAPI description is
at /openapi.json (the interactive docs are off: they load scripts from a CDN).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import os
import time
from contextlib import asynccontextmanager
from functools import partial

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..caveats import random_weights_note
from ..errors import ConfigError
from ..models import parse_layers
from ..version import __version__
from .batching import Batcher, BatcherDead, Job, JobResult
from .codec import (
    ARROW_MEDIA_TYPE,
    FORMATS,
    NPY_MEDIA_TYPE,
    ApiError,
    Outcome,
    binary_headers,
    encode_arrow,
    encode_json,
    encode_npy,
    header_error,
    parse_uploads,
)
from .config import ServeConfig
from .engine import Engine
from .index import NeighborIndex
from .metrics import Metrics

PAGE = os.path.join(os.path.dirname(__file__), "page.html")
ENDPOINTS = ("/", "/healthz", "/metrics", "/openapi.json", "/v1/model", "/v1/index", "/v1/features",
             "/v1/neighbors", "/v1/thumbnail")  # fmt: skip
CLIENT_GONE = 499  # nginx's "client closed request": recorded in the metrics, never seen by the client
RETRY_AFTER_S = "1"  # a full queue drains in about max_queue / throughput: seconds on a CPU, less on a GPU

_BINARY = {"type": "string", "format": "binary"}
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "One image as the raw body, or one or more images as the file parts of a multipart body.",
        "content": {
            "image/*": {"schema": _BINARY},
            "application/octet-stream": {"schema": _BINARY},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"image": {"type": "array", "items": _BINARY}}}
            },
        },
    }
}
_ERROR = {"description": "JSON error: {error: {status, kind, message}}"}
REFUSALS = {
    400: _ERROR, 401: _ERROR, 413: _ERROR, 415: _ERROR, 422: _ERROR, 429: {"description": "queue full; see Retry-After"},
    500: {"description": "the batch could not run (a server failure, not the image's)"},
    503: {"description": "no answer within --request-timeout, or the batching threads stopped"},
}  # fmt: skip


class _RequestMetrics:
    """Counts every request by endpoint and status and times it (a plain ASGI wrapper: it must not
    consume the request body, which the handlers stream themselves)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"  # bounded label values
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: JobResult) -> None:
    """Called from a batcher thread: hand the result to the event loop."""

    def set_result():
        if not future.done():
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(set_result)
    except RuntimeError:  # the loop closed: the server is shutting down and nobody waits any more
        pass


async def _until_disconnect(receive) -> None:
    # Once the body is read, the next ASGI message is http.disconnect, sent when the client goes away.
    while (await receive())["type"] != "http.disconnect":
        pass


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def create_app(cfg: ServeConfig, engine: Engine, batcher: Batcher, metrics: Metrics, index: NeighborIndex | None):
    token = cfg.token.encode() if cfg.token else None
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(
        title="fastfeat serve",
        version=__version__,
        description="DeCAF features on demand: CNN activations of uploaded images, dynamically batched, and "
        "their nearest neighbours in an extracted dataset.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(_RequestMetrics, metrics=metrics)

    # -- errors ---------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        metrics.errors.labels(exc.kind).inc()
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
        return await api_error(request, ApiError(400, "bad_request", f"{where}: {first.get('msg')}".lstrip(": ")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return await api_error(request, ApiError(exc.status_code, kind, str(exc.detail)))

    def auth(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, b"Bearer " + token):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                           headers={"WWW-Authenticate": 'Bearer realm="fastfeat"'})  # fmt: skip

    protected = [Depends(auth)]

    # -- the shared path of /v1/features and /v1/neighbors --------------------------------------
    async def read_body(request: Request) -> bytes:
        limit = cfg.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:  # refused before a byte of the body is read
            raise ApiError(413, "body_too_large", f"request body of {int(length)} bytes is over the limit of {limit} (--max-body-mb)")  # fmt: skip
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:  # chunked bodies announce no length
                raise ApiError(413, "body_too_large", f"request body over the limit of {limit} bytes (--max-body-mb)")  # fmt: skip
        return bytes(body)

    async def run_images(request: Request, raw_id: str | None) -> list[Outcome] | None:
        """Every image of the request through the header check, the batcher and the forward pass;
        None when the client went away before its features were ready."""
        try:
            body = await read_body(request)
        except ClientDisconnect:
            metrics.errors.labels("client_gone").inc()
            return None
        uploads = await parse_uploads(request.headers, body, raw_id, cfg.queue_limit)
        checks = await run_in_threadpool(lambda: [engine.check(u.data) for u in uploads])
        loop = asyncio.get_running_loop()
        outcomes, jobs, waits = [], [], []
        for upload, (encoded, (width, height), reason) in zip(uploads, checks, strict=True):
            outcome = Outcome(upload.id, width, height)
            if reason is not None:
                outcome.error = header_error(reason)
            else:
                future = loop.create_future()
                jobs.append(Job(encoded, (width, height), partial(_resolve, loop, future)))
                waits.append((outcome, future))
            outcomes.append(outcome)
        if jobs:
            try:
                admitted = batcher.submit(jobs)
            except BatcherDead as exc:
                raise ApiError(503, "batcher_dead", f"the server cannot compute features: {exc}") from None
            if not admitted:
                raise ApiError(429, "queue_full", f"the server holds {batcher.admitted} images, at its limit of {cfg.queue_limit} (--max-queue); retry later",  # fmt: skip
                               headers={"Retry-After": RETRY_AFTER_S})  # fmt: skip
            metrics.admitted.inc(len(jobs))
            results = asyncio.gather(*(f for _, f in waits))
            gone = asyncio.ensure_future(_until_disconnect(request.receive))
            try:
                done, _ = await asyncio.wait(
                    {results, gone}, timeout=cfg.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                gone.cancel()
            if not done:  # neither answered nor gone: the batch is stuck or the queue too long
                batcher.cancel(jobs)
                results.cancel()
                raise ApiError(503, "timeout", f"no answer within {cfg.request_timeout_s:g} s (--request-timeout); retry later",  # fmt: skip
                               headers={"Retry-After": RETRY_AFTER_S})  # fmt: skip
            if results not in done:
                batcher.cancel(jobs)  # frees their slots now; waiting ones never reach the decoder
                results.cancel()
                metrics.errors.labels("client_gone").inc()
                return None
            for outcome, future in waits:
                r: JobResult = future.result()
                outcome.batch_size = r.batch_size
                outcome.timing = {"queue": _ms(r.queue_s), "decode": _ms(r.decode_s), "forward": _ms(r.forward_s)}
                if r.failure:
                    outcome.error = ApiError(500, "server_failure", f"the batch could not run: {r.failure}")
                elif r.error:
                    outcome.error = ApiError(422, "decode_failed", f"cannot decode the image: {r.error}")
                else:
                    outcome.features, outcome.warning = r.features, r.warning
        for o in outcomes:
            if o.error:
                metrics.errors.labels(o.error.kind).inc()
            metrics.images.labels("error" if o.error else "warned" if o.warning else "ok").inc()
        return outcomes

    def all_failed(outcomes: list[Outcome]) -> JSONResponse | None:
        """The response of a request none of whose images could be used (already counted per image)."""
        if any(o.features is not None for o in outcomes):
            return None
        first = outcomes[0].error
        statuses = {o.error.status for o in outcomes}
        status = statuses.pop() if len(statuses) == 1 else 422
        if len(outcomes) == 1:
            error = first.body()["error"]
        else:
            message = f"none of the {len(outcomes)} images could be used; the first: {first.message}"
            error = {"status": status, "kind": "no_usable_image", "message": message}
        return JSONResponse({"error": error, "images": [o.error_record() for o in outcomes]}, status)

    def requested_layers(layers: str | None) -> list[str]:
        if layers is None:
            return engine.layers
        try:
            names = parse_layers(engine.spec, layers)
        except ConfigError as exc:  # an unknown layer name
            raise ApiError(400, "bad_layer", str(exc)) from None
        if extra := [n for n in names if n not in engine.layers]:
            raise ApiError(400, "bad_layer", f"layer {extra[0]} is not served; this server computes {','.join(engine.layers)} (--layers)")  # fmt: skip
        return names

    # -- routes ---------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home():
        return HTMLResponse(page)

    @app.get("/healthz", summary="Liveness: ok once the model is loaded (no token needed)")
    async def healthz():
        if not batcher.alive:  # requests could only fail: a load balancer must take this server out
            why = batcher.death or "the batching threads are not running"
            return JSONResponse({"status": "failing", "reason": why}, 503)
        return {"status": "ok", "queue_images": batcher.waiting, "inflight_images": batcher.admitted}

    @app.get("/metrics", dependencies=protected, summary="Prometheus metrics (text format)")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/model", dependencies=protected, summary="How the features are made: a shard's metadata")
    async def model():
        note = random_weights_note(engine.metadata.get("weights"))
        return engine.metadata if note is None else {**engine.metadata, "warning": note}

    @app.get("/v1/index", dependencies=protected, summary="The --index directory: rows, layer, search kind")
    async def index_info():
        if index is None:
            raise ApiError(404, "no_index", "this server was started without --index DIR")
        return index.describe()

    @app.post(
        "/v1/features", dependencies=protected, openapi_extra=IMAGE_BODY, responses=REFUSALS,
        summary="Features of one or more images",
        description="Per image: id, width, height and each layer's vector. format=json (arrays), npy (one "
        "[images, sum of dims] array, the layers concatenated in order; X-Fastfeat-Layers/-Rows headers, and "
        "-Images/-Errors while they fit in 3000 bytes), or arrow (an IPC stream with a Parquet shard's schema). An image that fails is listed "
        "with its error; its neighbours in the request still get their features.",
    )  # fmt: skip
    async def features(
        request: Request,
        layers: str | None = Query(None, description="comma-separated subset of the served layers"),
        format: str = Query("json", description="json, npy or arrow"),
        dtype: str | None = Query(None, description="float16 or float32 (default: the server's --dtype)"),
        id: str | None = Query(None, description="the id of a raw-body image (multipart parts use their file name)"),
    ):
        names = requested_layers(layers)
        if format not in FORMATS:
            raise ApiError(400, "bad_format", f"unknown format {format!r}; choose json, npy or arrow")
        dtype = dtype or cfg.dtype
        if dtype not in ("float16", "float32"):
            raise ApiError(400, "bad_dtype", f"unknown dtype {dtype!r}; choose float16 or float32")
        t0 = time.perf_counter()
        outcomes = await run_images(request, id)
        if outcomes is None:
            return Response(status_code=CLIENT_GONE)
        if (failed := all_failed(outcomes)) is not None:
            return failed
        if format == "json":
            extra = {"model": engine.spec.name, "request_ms": _ms(time.perf_counter() - t0)}
            body = await run_in_threadpool(encode_json, outcomes, names, dtype, extra)
            return Response(body, media_type="application/json")
        # Encoding a few hundred rows takes milliseconds: off the event loop, which serves every other request.
        headers = await run_in_threadpool(binary_headers, outcomes, names, engine.dims)
        if format == "npy":
            body = await run_in_threadpool(encode_npy, outcomes, names, engine.dims, dtype)
            return Response(body, media_type=NPY_MEDIA_TYPE, headers=headers)
        body = await run_in_threadpool(encode_arrow, outcomes, names, engine.dims, dtype, engine.metadata)
        return Response(body, media_type=ARROW_MEDIA_TYPE, headers=headers)

    @app.post(
        "/v1/neighbors", dependencies=protected, openapi_extra=IMAGE_BODY, responses={**REFUSALS, 404: _ERROR},
        summary="The k most similar images of the --index directory (cosine of the index layer's features)",
    )  # fmt: skip
    async def neighbors(
        request: Request,
        k: int = Query(10, ge=1, le=1000, description="neighbours per image"),
        id: str | None = Query(None, description="the id of a raw-body image"),
    ):
        if index is None:
            raise ApiError(404, "no_index", "this server was started without --index DIR")
        t0 = time.perf_counter()
        outcomes = await run_images(request, id)
        if outcomes is None:
            return Response(status_code=CLIENT_GONE)
        if (failed := all_failed(outcomes)) is not None:
            return failed
        good = [i for i, o in enumerate(outcomes) if o.features is not None]
        t_search = time.perf_counter()
        hits = await run_in_threadpool(index.search, np.stack([outcomes[i].features[index.layer] for i in good]), k)
        search_ms = _ms(time.perf_counter() - t_search)
        found = dict(zip(good, hits, strict=True))
        images = [
            {**o.head(), "neighbors": found[i]} if i in found else o.error_record() for i, o in enumerate(outcomes)
        ]
        return {"layer": index.layer, "search": index.kind, "k": k, "search_ms": search_ms,
                "request_ms": _ms(time.perf_counter() - t0), "images": images}  # fmt: skip

    @app.get(
        "/v1/thumbnail", dependencies=protected, responses={200: {"content": {"image/jpeg": {}}}, 404: _ERROR},
        summary="A small JPEG of an indexed image, read from the extract's source when it is reachable",
    )  # fmt: skip
    def thumbnail(id: str = Query(..., description="an id of the index"), size: int = Query(128, ge=16, le=512)):
        if index is None:
            raise ApiError(404, "no_index", "this server was started without --index DIR")
        item = index.item(id)
        if item is None:
            raise ApiError(404, "not_found", f"no reachable indexed image with id {id!r}")
        return Response(_thumbnail_jpeg(item, index.image_column, size, engine.max_pixels), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})  # fmt: skip

    return app


def _thumbnail_jpeg(item, image_column: str, size: int, max_pixels: int) -> bytes:
    from PIL import Image, ImageOps

    from ..faults import ReadFault
    from ..header import read_image
    from ..sources.reader import ItemReader

    try:
        data, _, err = read_image(item, max_pixels, ItemReader(image_column, retries=2))  # the same header limits first
    except ReadFault as exc:  # the storage's fault, not the image's: worth trying again later
        raise ApiError(503, "storage_unavailable", f"{item.id}: cannot read the image now: {exc}") from None
    if err:
        raise ApiError(422, "bad_image", f"{item.id}: {err[1]}")
    buf = io.BytesIO()
    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size))
            im.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError) as exc:  # Pillow's errors for a file it cannot decode
        raise ApiError(422, "bad_image", f"{item.id}: cannot make a thumbnail: {exc}") from None
    return buf.getvalue()
