"""Read BVLC ``.caffemodel`` files without Caffe or protobuf installed.

A .caffemodel is a serialised ``caffe.NetParameter`` (protobuf wire format).  Only
the fields needed to recover the learned blobs are decoded; everything else is
skipped by wire type.  Field numbers are those of BVLC caffe.proto:

    NetParameter      : name=1, layers=2 (V1LayerParameter, legacy), layer=100 (LayerParameter)
    LayerParameter    : name=1, type=2 (string), blobs=7
    V1LayerParameter  : name=4, type=5 (enum), blobs=6
    BlobProto         : num=1, channels=2, height=3, width=4, data=5 (packed float),
                        shape=7 (BlobShape), double_data=8 (packed double)
    BlobShape         : dim=1 (packed int64)

The released ``bvlc_reference_caffenet.caffemodel`` uses the legacy V1 ``layers``
field with 4-D num/channels/height/width blobs (fc weights as 1×1×out×in); both
layouts are handled.  Blob 0 becomes ``<layer>.weight`` and blob 1 ``<layer>.bias``.
"""

from __future__ import annotations

import numpy as np

from .errors import FastfeatError

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


class CaffeModelError(FastfeatError):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CaffeModelError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CaffeModelError("varint too long")


def _fields(buf: memoryview):
    """Yield (field_number, wire_type, value); value is an int or a memoryview."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _FIXED64:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise CaffeModelError("truncated length-delimited field")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == _FIXED32:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise CaffeModelError(f"unsupported wire type {wire}")
        if pos > end:
            raise CaffeModelError("truncated field")
        yield field, wire, value


def _packed_varints(buf: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        v, pos = _varint(buf, pos)
        out.append(v)
    return out


def _blob(buf: memoryview) -> np.ndarray:
    legacy = {1: 0, 2: 0, 3: 0, 4: 0}
    shape: list[int] | None = None
    chunks: list[np.ndarray] = []
    for field, wire, value in _fields(buf):
        # Every field is checked against its declared wire type: a varint where bytes belong
        # must never be taken as a length to allocate.
        if field in legacy and wire == _VARINT:
            legacy[field] = value
        elif field == 7 and wire == _LEN:
            dims: list[int] = []
            for f, w, v in _fields(value):
                if f == 1 and w == _LEN:
                    dims.extend(_packed_varints(v))
                elif f == 1 and w == _VARINT:
                    dims.append(v)
            shape = dims
        elif field == 5 and wire in (_LEN, _FIXED32):  # float data, packed or one value
            chunks.append(np.frombuffer(value, dtype="<f4"))
        elif field == 8 and wire in (_LEN, _FIXED64):  # double data
            chunks.append(np.frombuffer(value, dtype="<f8").astype(np.float32))
        elif field in (5, 7, 8):
            raise CaffeModelError(f"blob field {field} has wire type {wire}")
    data = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)  # bounded by the file's size
    if shape is None:
        shape = [legacy[1], legacy[2], legacy[3], legacy[4]]
    if int(np.prod(shape)) != data.size:
        raise CaffeModelError(f"blob shape {shape} does not match its {data.size} values")
    return data.reshape(shape)


def read_caffemodel(data: bytes) -> dict[str, np.ndarray]:
    """Return ``{"<layer>.weight": array, "<layer>.bias": array}`` for every layer with blobs."""
    params: dict[str, np.ndarray] = {}
    found_layers = False
    for field, wire, value in _fields(memoryview(data)):
        if wire != _LEN or field not in (2, 100):
            continue
        found_layers = True
        name_field, blobs_field = (4, 6) if field == 2 else (1, 7)
        name, blobs = None, []
        for f, w, v in _fields(value):
            if f == name_field and w == _LEN:
                name = bytes(v).decode("utf-8", "replace")
            elif f == blobs_field and w == _LEN:
                blobs.append(_blob(v))
        if blobs and name:
            for suffix, blob in zip(("weight", "bias"), blobs, strict=False):
                params[f"{name}.{suffix}"] = blob
    if not found_layers:
        raise CaffeModelError("no layers found: not a caffe NetParameter")
    return params


def read_blobproto(data: bytes) -> np.ndarray:
    """One serialised ``caffe.BlobProto`` (a ``.binaryproto`` mean file such as ``VGG_mean.binaryproto``)
    as an array of its own shape (legacy num×channels×height×width, or ``shape``)."""
    blob = _blob(memoryview(data))
    if blob.size == 0:
        raise CaffeModelError("no values found: not a caffe BlobProto")
    return blob


def write_blobproto(array: np.ndarray) -> bytes:
    """A legacy 4-D BlobProto (num, channels, height, width), as Caffe's compute_image_mean writes one."""
    a = np.asarray(array, np.float32)
    dims = [1] * (4 - a.ndim) + list(a.shape)
    out = bytearray()
    for f, d in zip((1, 2, 3, 4), dims, strict=True):
        out += _key(f, _VARINT) + _encode_varint(d)
    out += _len_field(5, a.astype("<f4").tobytes())
    return bytes(out)


# -- writer (used by tests and by users converting back) ---------------------------------------
def _key(field: int, wire: int) -> bytes:
    return _encode_varint((field << 3) | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + _encode_varint(len(payload)) + payload


def write_caffemodel(params: dict[str, np.ndarray], legacy_v1: bool = False) -> bytes:
    """Serialise ``{"<layer>.weight"/".bias": array}`` as a NetParameter.

    ``legacy_v1`` writes the V1 ``layers`` field with 4-D num/channels/height/width
    blobs, the layout of the original BVLC release.
    """
    layers: dict[str, list[np.ndarray]] = {}
    for key, arr in params.items():
        name, suffix = key.rsplit(".", 1)
        layers.setdefault(name, [None, None])[0 if suffix == "weight" else 1] = np.asarray(arr, np.float32)
    out = bytearray()
    for name, blobs in layers.items():
        body = bytearray()
        body += _len_field(4 if legacy_v1 else 1, name.encode())
        for blob in blobs:
            if blob is None:
                continue
            b = bytearray()
            if legacy_v1:
                dims = [1] * (4 - blob.ndim) + list(blob.shape)
                for f, d in zip((1, 2, 3, 4), dims, strict=True):
                    b += _key(f, _VARINT) + _encode_varint(d)
            else:
                b += _len_field(7, _len_field(1, b"".join(_encode_varint(d) for d in blob.shape)))
            b += _len_field(5, blob.astype("<f4").tobytes())
            body += _len_field(6 if legacy_v1 else 7, bytes(b))
        out += _len_field(2 if legacy_v1 else 100, bytes(body))
    return bytes(out)
