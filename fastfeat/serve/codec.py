"""HTTP bodies in and out: the uploaded images of a request, the three response formats (JSON, ``.npy``,
Arrow IPC), and the JSON error body every refusal carries."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

FORMATS = ("json", "npy", "arrow")
NPY_MEDIA_TYPE = "application/x-npy"
ARROW_MEDIA_TYPE = "application/vnd.apache.arrow.stream"
# Content types that are certainly not an image: refused (415) before anything is parsed.
_NOT_IMAGES = ("text/", "application/json", "application/x-www-form-urlencoded", "application/xml")


class ApiError(Exception):
    """A refusal: HTTP ``status``, a machine-readable ``kind`` and a one-line ``message``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}

    def body(self) -> dict:
        return {"error": {"status": self.status, "kind": self.kind, "message": self.message}}


# read_image's reasons (fastfeat.decode) -> (status, kind). 415 only when the bytes are no known image
# format at all; an image we recognise but refuse (too large, unreadable header) is 422.
_HEADER_KINDS = (
    ("not a recognised image format", 415, "not_image"),
    ("image too large", 422, "too_many_pixels"),
    ("aspect ratio too extreme", 422, "aspect_ratio"),
    ("unreadable image header", 422, "bad_header"),
    ("empty file", 422, "empty"),
)


def header_error(message: str) -> ApiError:
    for prefix, status, kind in _HEADER_KINDS:
        if message.startswith(prefix):
            return ApiError(status, kind, message)
    return ApiError(422, "bad_image", message)


@dataclass
class Upload:
    id: str
    data: bytes


@dataclass
class Outcome:
    """One image of a request: its features, or why it has none."""

    id: str
    width: int = 0
    height: int = 0
    features: dict[str, np.ndarray] | None = None
    error: ApiError | None = None
    warning: str | None = None
    batch_size: int = 0  # images in the forward pass it rode in
    timing: dict = field(default_factory=dict)  # ms: queue (waiting for its batch), decode, forward

    def head(self) -> dict:
        out = {"id": self.id, "width": self.width, "height": self.height}
        if self.warning:
            out["warning"] = self.warning
        if self.batch_size:
            out["batch_size"] = self.batch_size
        if self.timing:
            out["timing_ms"] = self.timing
        return out

    def error_record(self) -> dict:
        return {"id": self.id, **(self.error.body()["error"] if self.error else {})}


def check_content_type(content_type: str) -> None:
    if content_type.lower().startswith(_NOT_IMAGES):
        raise ApiError(
            415, "not_image",
            f"Content-Type {content_type.split(';')[0]} is not an image: send the image bytes as the body "
            "(image/* or application/octet-stream) or images as multipart/form-data",
        )  # fmt: skip


async def parse_uploads(headers, body: bytes, raw_id: str | None, max_images: int) -> list[Upload]:
    """The images of a request: the whole body, or every file part of a multipart/form-data body."""
    content_type = headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        check_content_type(content_type)
        if not body:
            raise ApiError(400, "no_image", "the request body is empty: send an image")
        return [Upload(raw_id or "image", body)]
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once():
        yield body

    try:
        form = await MultiPartParser(headers, once(), max_files=max_images + 1, max_fields=1000).parse()
    except MultiPartException as exc:
        raise ApiError(400, "bad_multipart", f"cannot parse the multipart body: {exc.message}") from None
    uploads = []
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):  # plain text fields are options, not images: ignored
                uploads.append(Upload(value.filename or name or f"image{len(uploads)}", await value.read()))
    finally:
        await form.close()
    if not uploads:
        raise ApiError(400, "no_image", "the multipart body holds no file part: send images as files (-F img=@a.jpg)")
    if len(uploads) > max_images:
        raise ApiError(413, "too_many_images", f"{len(uploads)} images in one request, over the limit of {max_images} (--max-queue)")  # fmt: skip
    return uploads


def _cast(values: np.ndarray, dtype: str) -> np.ndarray:
    return values.astype(np.float16) if dtype == "float16" else values


def encode_json(outcomes: list[Outcome], layers: list[str], dtype: str, extra: dict) -> bytes:
    images = []
    for o in outcomes:
        if o.features is None:
            images.append(o.error_record())
        else:
            # float16 values are exact in JSON's doubles; tolist() gives the shortest repr that round-trips.
            images.append({**o.head(), "features": {n: _cast(o.features[n], dtype).tolist() for n in layers}})
    return json.dumps({**extra, "layers": layers, "dtype": dtype, "images": images}, separators=(",", ":")).encode()


def _ascii_json(value) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


# The per-image headers of a binary response, together, at most this many bytes: nginx's default
# proxy_buffer_size (4 KiB) must hold the whole response head, and a 256-image request's details are tens
# of KB (a 502 behind it).  Over the limit they are left out (X-Fastfeat-Details says so); the arrow body
# always carries them in its schema metadata, and format=json in its body.
DETAIL_HEADER_LIMIT = 3000


def _positions(outcomes: list[Outcome]) -> str:
    """The request positions of the rows, as ranges ("0-2,4"): short whatever the request's size."""
    spans: list[list[int]] = []
    for i, o in enumerate(outcomes):
        if o.features is None:
            continue
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def image_details(outcomes: list[Outcome]) -> tuple[list[dict], list[dict]]:
    """(the rows' images, the failed images): what a binary body's rows do not say themselves."""
    return [o.head() for o in outcomes if o.features is not None], [o.error_record() for o in outcomes if o.features is None]  # fmt: skip


def binary_headers(outcomes: list[Outcome], layers: list[str], dims: dict[str, int]) -> dict[str, str]:
    """The layers and the rows' request positions, always; the per-image details (JSON, ASCII) when they fit
    in DETAIL_HEADER_LIMIT bytes."""
    images, errors = image_details(outcomes)
    headers = {
        "X-Fastfeat-Layers": ",".join(f"{n}:{dims[n]}" for n in layers),
        "X-Fastfeat-Rows": _positions(outcomes),
    }
    details = {"X-Fastfeat-Images": _ascii_json(images), "X-Fastfeat-Errors": _ascii_json(errors)}
    size = sum(len(v) for v in details.values())
    if size <= DETAIL_HEADER_LIMIT:
        return {**headers, **details}
    headers["X-Fastfeat-Details"] = (
        f"omitted: {size} bytes, over the {DETAIL_HEADER_LIMIT}-byte limit; format=arrow (schema metadata) or json has them"
    )
    return headers


def encode_npy(outcomes: list[Outcome], layers: list[str], dims: dict[str, int], dtype: str) -> bytes:
    """One [images, sum of the layers' dims] array: each row is the image's layers concatenated in order."""
    good = [o for o in outcomes if o.features is not None]
    rows = np.empty((len(good), sum(dims[n] for n in layers)), dtype=np.dtype(dtype))
    for r, o in enumerate(good):
        rows[r] = np.concatenate([o.features[n] for n in layers])  # cast on assignment, as extract casts
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


def encode_arrow(outcomes: list[Outcome], layers: list[str], dims: dict[str, int], dtype: str, metadata: dict) -> bytes:
    """An Arrow IPC stream with the schema of a Parquet shard (id, label, width, height, one column per layer)."""
    import pyarrow as pa

    from ..sinks.base import Layout, Rows
    from ..sinks.parquet import feature_schema, record_batch

    good = [o for o in outcomes if o.features is not None]
    meta = {**metadata, "dtype": dtype, "layers": {n: metadata["layers"][n] for n in layers}}
    schema = feature_schema(Layout({n: dims[n] for n in layers}, dtype, meta))
    feats = {n: np.stack([_cast(o.features[n], dtype) for o in good]) if good else np.empty((0, dims[n]), dtype) for n in layers}  # fmt: skip
    rows = Rows([o.id for o in good], [None] * len(good), [(o.width, o.height) for o in good], feats)
    images, errors = image_details(outcomes)
    schema = schema.with_metadata(
        {**(schema.metadata or {}), b"fastfeat.images": _ascii_json(images), b"fastfeat.errors": _ascii_json(errors)}
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(record_batch(schema, rows))
    return sink.getvalue().to_pybytes()
