"""The items of a source: :class:`Item`, the compact :class:`ItemList` that holds them, and what
every kind of source shares (the image extensions, progress reporting, :class:`SourceError`)."""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, overload

from .. import storage
from ..errors import FastfeatError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pnm", ".ppm", ".pgm", ".jp2", ".gif"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list", ".csv", ".tsv"})
PROGRESS_EVERY = 10_000  # ``progress`` is called about every this many entries (files, lines, members, rows)

Progress = Callable[[int], None]


class SourceError(FastfeatError):
    pass


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    path: str  # absolute path of the file that holds the image
    label: str | None
    offset: int | None = None  # tar member: byte offset of its data in ``path``; Parquet: row index
    size: int | None = None  # tar member: byte length
    error: str | None = None  # an entry refused at listing time (unsafe tar path), reported when read


class Skipped(NamedTuple):
    """A folder entry that listing left out (``ItemList.skipped``)."""

    path: str  # relative to the source folder, ``/`` separators
    reason: str  # "loop" (a folder link back to a folder it is inside), "broken link", "unreadable", "not a file"
    target: str | None  # a link's target, as written in the link
    message: str | None  # why: the error, or what the entry is


def _encode(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")  # undecodable file names round-trip (os.fsdecode's escapes)


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _small_codes(codes: array, n_values: int) -> array:
    """The same integer codes (-1 = none) in the smallest array type that holds them."""
    for typecode, limit in (("b", 1 << 7), ("h", 1 << 15)):
        if n_values < limit:
            return array(typecode, codes)
    return codes


class ItemList(Sequence[Item]):
    """The items of a source, in order: a read-only sequence of :class:`Item`.

    Columns are held compactly: ids in one UTF-8 buffer with end offsets, labels and
    container paths as codes into small tables, a folder's paths as ``root/id``, tar
    offsets/sizes as integer arrays.  ``items[i]`` makes an ``Item``; ``items[a:b]`` a
    list of them.  ``ids()``/``labels()`` iterate one column without making Items.
    ``skipped`` lists the folder entries that listing left out (see :func:`format_skipped`).
    """

    __slots__ = ("_blob", "_ends", "_labels", "_label_table", "_root", "_path_mode", "_prefix", "_path_codes",
                 "_path_table", "_offsets", "_sizes", "_errors", "skipped")  # fmt: skip

    def __init__(self, blob: bytes, ends: array, labels: array, label_table: list[str], *, root: str | None = None,
                 path_mode: str = "join", path_codes: array | None = None, path_table: list[str] | None = None,
                 offsets: array | None = None, sizes: array | None = None, errors: dict[int, str] | None = None,
                 skipped: list[Skipped] | None = None):  # fmt: skip
        self._blob, self._ends = blob, ends
        self._labels, self._label_table = labels, label_table
        # path_mode "join": root/id (a folder); "abspath": abspath(join(root, id)) (a list file);
        # "table": path_table[path_codes[i]] (tar and Parquet sources: a few container files);
        # "uri": root is a remote folder URI, the path is the id joined to it (unless the id is a URI).
        self._root, self._path_mode = root, path_mode
        self._prefix = os.path.join(root, "") if root is not None else ""
        self._path_codes, self._path_table = path_codes, path_table or []
        self._offsets, self._sizes, self._errors = offsets, sizes, errors or {}
        self.skipped: list[Skipped] = skipped or []

    def __len__(self) -> int:
        return len(self._ends)

    def _id(self, i: int) -> str:
        return _decode(self._blob[self._ends[i - 1] if i else 0 : self._ends[i]])

    def _path(self, i: int, id_: str) -> str:
        if self._path_mode == "join":  # root is absolute and normalised, id has no "." or ".." parts
            return self._prefix + (id_ if os.sep == "/" else id_.replace("/", os.sep))
        if self._path_mode == "abspath":
            if "://" in id_:  # a list line naming an object (s3://...) or a file:// URI
                return storage.local_path(id_)
            return os.path.abspath(os.path.join(self._root, id_))
        if self._path_mode == "uri":  # a line of a remote list may name a URI or an absolute local path
            return (
                storage.local_path(id_) if storage.scheme(id_) or id_.startswith("/") else storage.join(self._root, id_)
            )
        return self._path_table[self._path_codes[i]]

    def _item(self, i: int) -> Item:
        id_ = self._id(i)
        code = self._labels[i]
        offset = size = None
        if self._offsets is not None and (o := self._offsets[i]) >= 0:
            offset = o
        if self._sizes is not None and (s := self._sizes[i]) >= 0:
            size = s
        label = None if code < 0 else self._label_table[code]
        return Item(id_, self._path(i, id_), label, offset, size, self._errors.get(i))

    @overload
    def __getitem__(self, index: int) -> Item: ...
    @overload
    def __getitem__(self, index: slice) -> list[Item]: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(len(self)))]
        n = len(self)
        i = index.__index__()
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("item index out of range")
        return self._item(i)

    def __iter__(self) -> Iterator[Item]:
        return (self._item(i) for i in range(len(self)))

    def ids(self) -> Iterator[str]:
        blob, start = self._blob, 0
        for end in self._ends:
            yield _decode(blob[start:end])
            start = end

    def labels(self) -> Iterator[str | None]:
        table = self._label_table
        return (None if c < 0 else table[c] for c in self._labels)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(it) for it in self[:2])
        return f"ItemList({len(self)} items: [{head}{', ...' if len(self) > 2 else ''}])"

    def nbytes(self) -> int:
        """Bytes held by the columns (not counting the small tables)."""
        arrays = (self._ends, self._labels, self._path_codes, self._offsets, self._sizes)
        return len(self._blob) + sum(a.itemsize * len(a) for a in arrays if a is not None)


class _Builder:
    """Appends items one by one into ItemList columns (list files, tar and Parquet sources)."""

    def __init__(self, root: str | None = None, path_mode: str = "table", progress: Progress | None = None):
        self.root, self.path_mode, self.progress = root, path_mode, progress
        self.blob = bytearray()
        self.ends = array("Q")
        self.labels = array("i")
        self.label_codes: dict[str, int] = {}
        self.path_codes = array("i")
        self.path_index: dict[str, int] = {}
        self.offsets = array("q")
        self.sizes = array("q")
        self.errors: dict[int, str] = {}
        self.seen: set[str] = set()

    def __len__(self) -> int:
        return len(self.ends)

    def add(self, id_: str, label: str | None, path: str | None = None, offset: int | None = None,
            size: int | None = None, error: str | None = None) -> None:  # fmt: skip
        """Raises KeyError(id) for a duplicate id."""
        if id_ in self.seen:
            raise KeyError(id_)
        self.seen.add(id_)
        n = len(self.ends)
        if error is not None:
            self.errors[n] = error
        self.blob += _encode(id_)
        self.ends.append(len(self.blob))
        self.labels.append(-1 if label is None else self.label_codes.setdefault(label, len(self.label_codes)))
        if self.path_mode == "table":
            self.path_codes.append(self.path_index.setdefault(path, len(self.path_index)))
        self.offsets.append(-1 if offset is None else offset)
        self.sizes.append(-1 if size is None else size)
        if self.progress is not None and (n + 1) % PROGRESS_EVERY == 0:
            self.progress(n + 1)

    def build(self) -> ItemList:
        table = self.path_mode == "table"
        return ItemList(
            self.blob, _compact_ends(self.ends), _small_codes(self.labels, len(self.label_codes)),
            list(self.label_codes), root=self.root, path_mode=self.path_mode,
            path_codes=_small_codes(self.path_codes, len(self.path_index)) if table else None,
            path_table=list(self.path_index) if table else None,
            offsets=self.offsets if any(o >= 0 for o in self.offsets) else None,
            sizes=self.sizes if any(s >= 0 for s in self.sizes) else None,
            errors=self.errors,
        )  # fmt: skip


def _compact_ends(ends: array) -> array:
    return array("I", ends) if not ends or ends[-1] < (1 << 32) else ends
