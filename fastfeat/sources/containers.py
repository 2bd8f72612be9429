"""Container sources: WebDataset tar shards and Parquet files, and the brace patterns that name them."""

from __future__ import annotations

import os
import re
import tarfile

from .. import storage
from .items import ItemList, Progress, SourceError, _Builder

MAX_LABEL_BYTES = 4096  # a .cls/.txt label member longer than this is not a label
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pnm")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar; ``{x,y}`` -> x, y (nested left to right)."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [p for c in choices for p in expand_braces(head + c + tail)]


def _unsafe_member(name: str) -> bool:
    return name.startswith("/") or ".." in name.replace("\\", "/").split("/")


def _read_tars(paths: list[str], progress: Progress | None = None) -> ItemList:
    out = _Builder(progress=progress)
    for path in paths:
        try:
            if storage.is_remote(path):
                _remote_tar_items(path, out)
                continue
            with tarfile.open(path, mode="r:") as tar:  # uncompressed: members are read in place by offset
                _tar_items(tar, os.path.abspath(path), out)
        except (tarfile.TarError, OSError) as exc:
            raise SourceError(f"cannot read tar shard {storage.display(path)}: {storage.describe(exc)}") from None
        except KeyError as exc:
            raise SourceError(f"duplicate id {exc.args[0]!r} in tar shard {path}: ids must be unique") from None
    if progress is not None:
        progress(len(out))
    return out.build()


def _remote_tar_items(path: str, out: _Builder) -> None:
    """A remote tar, streamed once from start to end (one GET) instead of a ranged GET per member
    header; the small label members are kept as they stream by."""
    fs, key = storage.resolve(path)
    with fs.open_input_stream(key) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        members, labels = [], {}
        for m in tar:
            members.append(m)
            if m.isfile() and m.size <= MAX_LABEL_BYTES and m.name.lower().endswith((".cls", ".txt")):
                labels[m.name] = tar.extractfile(m).read()
    _tar_items(members, path, out, read=lambda m: labels[m.name])


def _tar_items(tar: tarfile.TarFile | list[tarfile.TarInfo], path: str, out: _Builder, read=None) -> None:
    """``tar`` an open tar file, or (a streamed remote one) its members, with ``read`` giving a label
    member's bytes."""
    if isinstance(tar, tarfile.TarFile):
        members, read = tar.getmembers(), (lambda m, tar=tar: tar.extractfile(m).read())
    else:
        members = tar
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    unsafe: list[str] = []
    for m in members:
        if not m.isfile():
            continue
        if _unsafe_member(m.name):
            unsafe.append(m.name)
            continue
        folder, base = os.path.split(m.name)
        if "." not in base:
            continue
        stem, ext = base.split(".", 1)
        groups.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = m
    for name in unsafe:
        out.add(name, None, path, error=f"unsafe tar member path {name!r} in {path}")
    for key, group in groups.items():  # insertion order: the order of the tar
        image = next((group[e] for e in TAR_IMAGE_EXTENSIONS if e in group), None)
        if image is None:
            continue
        label_member = group.get("cls") or group.get("txt")
        label = None
        if label_member is not None and label_member.size <= MAX_LABEL_BYTES:
            label = read(label_member).decode("utf-8", "replace").strip()
        out.add(key, label, path, offset=image.offset_data, size=image.size)


def _read_parquets(paths: list[str], image_column: str, progress: Progress | None = None) -> ItemList:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = _Builder(progress=progress)
    for path in paths:
        remote = storage.is_remote(path)
        try:
            pf = pq.ParquetFile(storage.open_input_file(path) if remote else path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            where = storage.display(path) if remote else path
            raise SourceError(f"cannot read Parquet source {where}: {storage.describe(exc)}") from None
        names = pf.schema_arrow.names
        if image_column not in names:
            raise SourceError(
                f"{path}: no image column {image_column!r} (columns: {', '.join(names)}); use --image-column"
            )
        col_type = pf.schema_arrow.field(image_column).type
        is_binary = pa.types.is_binary(col_type) or pa.types.is_large_binary(col_type)
        is_struct = pa.types.is_struct(col_type) and col_type.get_field_index("bytes") >= 0
        if not (is_binary or is_struct):
            raise SourceError(
                f"{path}: column {image_column!r} is {col_type}, not binary image bytes or a struct with 'bytes'"
            )
        labels = pf.read(columns=["label"]).column(0).to_pylist() if "label" in names else [None] * pf.metadata.num_rows
        base = storage.basename(path)
        abspath = path if remote else os.path.abspath(path)
        try:
            for row, label in enumerate(labels):
                out.add(f"{base}:{row}", None if label is None else str(label), abspath, offset=row)
        except KeyError as exc:
            raise SourceError(
                f"duplicate id {exc.args[0]!r}: two Parquet sources named {base!r}; ids must be unique"
            ) from None
    if progress is not None:
        progress(len(out))
    return out.build()
