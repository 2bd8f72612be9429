"""Enumerate the images of a source in a deterministic order.

fastfeat owns ids, order and labels (DALI only ever sees bytes through
``external_source``):

* a folder, walked recursively; an image's id is its path relative to the folder
  (with ``/`` separators) and its label is the first-level subfolder name, if any;
* a list file (``.txt``/``.lst``/``.tsv``/``.csv``): one path per line, optionally
  followed by a label (tab- or whitespace-separated; comma-separated in ``.csv``).  Relative paths are resolved
  against the list file's folder and the id is the path as written.  Blank lines
  and lines starting with ``#`` are skipped;
* WebDataset tar shards (``shards-{0000..0099}.tar``, brace patterns expanded):
  members are grouped by key (the member path up to the first dot of its file
  name); the key is the id, the image member (jpg, png, ...) is the image and a
  ``.cls`` or ``.txt`` member is the label.  Members whose path is absolute or
  contains ``..`` are rejected (reported as errors, never read);
* Parquet files (``data-{00..09}.parquet``) with an image column
  (``--image-column``, default ``image``): either binary, or a struct with
  ``bytes`` and ``path`` fields as Hugging Face datasets writes.  The id is
  ``<file name>:<row>``; a ``label`` column, if present, gives the label.

Order: folders are sorted by id (byte order of the UTF-8 path), list files keep
their line order, tar and Parquet sources follow the expanded pattern's order and
the order inside each file.  All are the same on every run and every machine,
and ids are unique within a source (checked).
"""

from __future__ import annotations

import csv
import os
import re
import tarfile
from dataclasses import dataclass

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pnm", ".ppm", ".pgm", ".jp2", ".gif"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list", ".csv", ".tsv"})


class SourceError(ValueError):
    pass


@dataclass(frozen=True)
class Item:
    id: str
    path: str  # absolute path of the file that holds the image
    label: str | None
    offset: int | None = None  # tar member: byte offset of its data in ``path``; Parquet: row index
    size: int | None = None  # tar member: byte length
    error: str | None = None  # an entry refused at listing time (unsafe tar path), reported when read


MAX_LABEL_BYTES = 4096  # a .cls/.txt label member longer than this is not a label
# Encoded files above this are refused unread: no JPEG/PNG a CNN should see is this large.
MAX_FILE_BYTES = 1 << 30
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


def _walk_folder(root: str) -> list[Item]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fname in filenames:
            if fname.startswith(".") or os.path.splitext(fname)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, fname)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            parts = rel.split("/")
            items.append(Item(rel, os.path.abspath(path), parts[0] if len(parts) > 1 else None))
    items.sort(key=lambda it: it.id.encode("utf-8"))
    return items


def _read_list(list_path: str) -> list[Item]:
    base = os.path.dirname(os.path.abspath(list_path))
    items, seen = [], set()
    ext = os.path.splitext(list_path)[1].lower()
    with open(list_path, encoding="utf-8", newline="") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if ext == ".csv":  # path[,label], with CSV quoting for paths that hold commas
                fields = next(csv.reader([line]))
                rel, label = fields[0].strip(), (fields[1].strip() or None) if len(fields) > 1 else None
            else:
                rel, label = _split_list_line(line, base)
            if rel in seen:
                raise SourceError(f"{list_path}:{lineno}: duplicate path {rel!r} (ids must be unique)")
            seen.add(rel)
            items.append(Item(rel, os.path.abspath(os.path.join(base, rel)), label))
    return items


def _split_list_line(line: str, base: str) -> tuple[str, str | None]:
    if "\t" in line:
        path, label = line.split("\t", 1)
        return path.strip(), (label.strip() or None)
    line = line.strip()
    # A path may itself contain spaces: take the whole line as the path when that file exists.
    if os.path.exists(os.path.join(base, line)):
        return line, None
    parts = line.rsplit(None, 1)
    if len(parts) == 2:
        return parts[0], parts[1]
    return line, None


def _unsafe_member(name: str) -> bool:
    return name.startswith("/") or ".." in name.replace("\\", "/").split("/")


def _read_tars(paths: list[str]) -> list[Item]:
    items: list[Item] = []
    for path in paths:
        try:
            with tarfile.open(path, mode="r:") as tar:  # uncompressed: members are read in place by offset
                items += _tar_items(tar, os.path.abspath(path))
        except (tarfile.TarError, OSError) as exc:
            raise SourceError(f"cannot read tar shard {path}: {exc}") from None
    return items


def _tar_items(tar: tarfile.TarFile, path: str) -> list[Item]:
    items: list[Item] = []
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for m in tar.getmembers():
        if not m.isfile():
            continue
        if _unsafe_member(m.name):
            items.append(Item(m.name, path, None, error=f"unsafe tar member path {m.name!r}"))
            continue
        folder, base = os.path.split(m.name)
        if "." not in base:
            continue
        stem, ext = base.split(".", 1)
        groups.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = m
    for key, group in groups.items():  # insertion order: the order of the tar
        image = next((group[e] for e in TAR_IMAGE_EXTENSIONS if e in group), None)
        if image is None:
            continue
        label_member = group.get("cls") or group.get("txt")
        label = None
        if label_member is not None and label_member.size <= MAX_LABEL_BYTES:
            label = tar.extractfile(label_member).read().decode("utf-8", "replace").strip()
        items.append(Item(key, path, label, offset=image.offset_data, size=image.size))
    return items


def _read_parquets(paths: list[str], image_column: str) -> list[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    items: list[Item] = []
    for path in paths:
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise SourceError(f"cannot read Parquet source {path}: {exc}") from None
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
        base = os.path.basename(path)
        for row, label in enumerate(labels):
            items.append(
                Item(f"{base}:{row}", os.path.abspath(path), None if label is None else str(label), offset=row)
            )
    return items


def source_kind(source: str) -> str:
    lower = source.lower()
    if lower.endswith(".tar"):
        return "webdataset"
    if lower.endswith(".parquet"):
        return "parquet"
    if os.path.isdir(source):
        return "folder"
    return "list"


def list_items(source: str, image_column: str = "image") -> list[Item]:
    """All images of ``source`` in order; raises SourceError for a missing or empty source."""
    kind = source_kind(source)
    if kind in ("webdataset", "parquet"):
        paths = expand_braces(source)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise SourceError(f"source does not exist: {missing[0]}")
        items = _read_tars(paths) if kind == "webdataset" else _read_parquets(paths, image_column)
    elif not os.path.exists(source):
        raise SourceError(f"source does not exist: {source}")
    elif kind == "folder":
        items = _walk_folder(source)
    elif os.path.splitext(source)[1].lower() in LIST_EXTENSIONS:
        items = _read_list(source)
    else:
        raise SourceError(
            f"source must be a folder, a list file ({', '.join(sorted(LIST_EXTENSIONS))}), .tar shards or .parquet files: {source}"
        )
    if not items:
        raise SourceError(f"source has no images: {source}")
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise SourceError(f"duplicate id {it.id!r} in {source}: ids must be unique")
        seen.add(it.id)
    return items


class ItemReader:
    """Reads an item's encoded bytes; keeps the current Parquet row group (items come in order)."""

    def __init__(self, image_column: str = "image"):
        self.image_column = image_column
        self._files: dict[str, object] = {}
        self._group: tuple[str, int, int, list] | None = None  # (path, first row, end row, values)

    def read(self, item: Item) -> bytes:
        if item.error:
            raise OSError(item.error)
        size = item.size if item.size is not None else (os.path.getsize(item.path) if item.offset is None else 0)
        if size > MAX_FILE_BYTES:
            raise OSError(f"file too large: {size} bytes (limit {MAX_FILE_BYTES})")
        if item.size is not None:  # tar member
            with open(item.path, "rb") as f:
                f.seek(item.offset)
                return f.read(item.size)
        if item.offset is not None:  # Parquet row
            return self._parquet_bytes(item.path, item.offset)
        with open(item.path, "rb") as f:
            return f.read()

    def _parquet_bytes(self, path: str, row: int) -> bytes:
        import pyarrow.parquet as pq

        g = self._group
        if g is None or g[0] != path or not g[1] <= row < g[2]:
            pf = self._files.get(path) or pq.ParquetFile(path)
            self._files = {path: pf}
            start = 0
            for i in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if row < start + n:
                    values = pf.read_row_group(i, columns=[self.image_column]).column(0).to_pylist()
                    self._group = g = (path, start, start + n, values)
                    break
                start += n
        value = g[3][row - g[1]]
        if isinstance(value, dict):
            value = value.get("bytes")
        if not value:
            raise OSError("empty image bytes")
        return value
