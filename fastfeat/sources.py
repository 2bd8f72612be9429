"""Enumerate the images of a source in a deterministic order.

fastfeat owns ids, order and labels (DALI only ever sees bytes through
``external_source``):

* a folder, walked recursively; an image's id is its path relative to the folder
  (with ``/`` separators) and its label is the first-level subfolder name, if any.
  Hidden files and folders (``.name``) are skipped, and only files with an image
  extension (:data:`IMAGE_EXTENSIONS`) are listed.  Symbolic links are followed,
  to files and to folders, except a folder link that loops back to a folder it is
  inside (the folder itself or one of its parents, the source included; folders
  are compared by ``(st_dev, st_ino)``, so bind mounts count too).  Such links,
  broken links and unreadable folders are skipped and reported in
  ``ItemList.skipped`` (see :func:`format_skipped`);
* a list file (``.txt``/``.lst``/``.list``/``.tsv``/``.csv``), one image per line.
  Relative paths are resolved against the list file's folder and the id is the
  path as written.  Blank lines and lines starting with ``#`` are skipped.  The
  format of a line, so that paths and labels may hold spaces:

  - ``.csv``: CSV (``path[,label]``; quote a field that holds a comma, quote or
    spaces at its ends).  An optional header row is recognised when its first
    field is ``path``, ``filename`` or ``file``; the label column is then the
    one named ``label`` (else the second one) and other columns are ignored.
    Without a header, a row with more than two fields is an error;
  - ``.tsv``, and any line that contains a tab: ``path<TAB>label`` (``path``
    alone: no label).  A ``.tsv`` may start with a header as ``.csv`` may.  More
    than two tab-separated fields are an error (unless a header names them);
  - other lines of ``.txt``/``.lst``/``.list`` files (no tab): the whole line is
    the path when it names an existing file or holds no white space; otherwise
    ``path label``, split at the last run of white space, which is accepted when
    the path part holds no white space or names an existing file.  Any other line
    could be split in more than one way and is an error (SourceError naming
    ``file:line``): write such lists with tabs, or as ``.tsv``/``.csv``;

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

:func:`list_items` returns an :class:`ItemList`: a read-only sequence of
:class:`Item` that holds its columns compactly (ids in one UTF-8 buffer, labels as
small integer codes, paths derived from the source's folder) and makes ``Item``
objects on access, so a million-image source takes tens of MB, not hundreds.

Any of these may live on object storage or another remote file system: a source given as a URI
(``s3://bucket/photos``, ``gs://bucket/shards-{0000..0099}.tar``, ``hdfs://...``) is listed and read
through ``pyarrow.fs`` (:mod:`fastfeat.storage`), with the same ids, labels and order as a local copy
(a folder is listed with one recursive key listing; a tar shard is streamed once to list its members;
an image is one GET, a tar member one ranged GET).  A list file's lines may be URIs too, and relative
lines of a remote list file are keys under its folder.  ``file://`` URIs are local paths.

Read errors (:meth:`ItemReader.read`) are ``OSError`` whose ``strerror`` (and
``str()``) name what was read: the file, the tar shard and member, or the
Parquet file and row.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tarfile
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, islice
from typing import NamedTuple, overload

from . import storage

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pnm", ".ppm", ".pgm", ".jp2", ".gif"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list", ".csv", ".tsv"})
_IMAGE_EXTENSIONS_B = frozenset(e.encode() for e in IMAGE_EXTENSIONS)
_HEADER_PATH_NAMES = frozenset({"path", "filename", "file"})
PROGRESS_EVERY = 10_000  # ``progress`` is called about every this many entries (files, lines, members, rows)

Progress = Callable[[int], None]


class SourceError(ValueError):
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


# ---------------------------------------------------------------------------------------------
# The item list: columns, Items made on access


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


# ---------------------------------------------------------------------------------------------
# Folders


def _walk_folder(root: str, progress: Progress | None = None) -> ItemList:
    """Sorted by id without a global sort: each folder's files and subfolders are sorted by name,
    a folder's name followed by ``/``, which is the byte order of the full ids (a folder's ids are
    contiguous and start with ``name/``).  Names stay bytes, file entries are classified from the
    directory listing's file types (no stat per file), and runs of files are appended in bulk."""
    root_abs = os.path.abspath(root)
    walk = _FolderWalk(progress)
    root_b = os.fsencode(root_abs)
    try:
        st = os.stat(root_b)
        files, dirs = walk.scan(root_b, b"")
    except OSError as exc:
        raise SourceError(f"cannot read folder {root}: {exc.strerror or exc}") from None
    blob, ends, labels, label_table, skipped = walk.blob, walk.ends, walk.labels, walk.label_table, walk.skipped
    # Depth first.  A frame: [files, dirs (names + b"/"), next file, next dir, path, id prefix, label, (dev, ino)];
    # ``ancestors`` holds the (dev, ino) of the folders on the stack: a folder among them is a loop.
    root_key = (st.st_dev, st.st_ino)
    stack = [[files, dirs, 0, 0, root_b, b"", -1, root_key]]
    ancestors = {root_key}
    while stack:
        frame = stack[-1]
        files, dirs, fi, di, dir_b, prefix, label, _ = frame
        while di < len(dirs):
            key_name = dirs[di]
            di += 1
            cut = bisect_left(files, key_name, fi)  # the files that sort before this folder's ids
            walk.emit(files, fi, cut, prefix, label)
            fi = cut
            name = key_name[:-1]
            sub_b, rel = os.path.join(dir_b, name), prefix + name
            try:
                st = os.stat(sub_b)
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    target = _readlink(sub_b)
                    skipped.append(Skipped(os.fsdecode(rel), "loop", target, None if target else "a parent folder"))
                    continue
                sub_files, sub_dirs = walk.scan(sub_b, rel + b"/")
            except OSError as exc:
                skipped.append(Skipped(os.fsdecode(rel), "unreadable", None, exc.strerror or str(exc)))
                continue
            sub_label = label
            if not prefix:
                sub_label = len(label_table)
                label_table.append(os.fsdecode(name))
            frame[2], frame[3] = fi, di
            stack.append([sub_files, sub_dirs, 0, 0, sub_b, rel + b"/", sub_label, key])
            ancestors.add(key)
            break
        else:
            walk.emit(files, fi, len(files), prefix, label)
            stack.pop()
            ancestors.discard(frame[7])
    if progress is not None:
        progress(len(ends))
    return ItemList(blob, _compact_ends(ends), _small_codes(labels, len(label_table)), label_table,
                    root=root_abs, path_mode="join", skipped=skipped)  # fmt: skip


def _walk_remote_folder(root: str, progress: Progress | None = None) -> ItemList:
    """A folder on an object store (a key prefix), listed in one recursive listing, with the ids,
    labels and order a local copy gets: hidden names skipped, image extensions only, byte order."""
    try:
        files = storage.walk_files(root)
    except OSError as exc:
        raise SourceError(f"cannot read folder {storage.display(root)}: {storage.describe(exc)}") from None
    ids = sorted(
        (_encode(f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
         and not any(part.startswith(".") for part in f.split("/"))),
    )  # fmt: skip
    out = _Builder(root, "uri", progress)
    for id_b in ids:
        head, sep, _ = id_b.partition(b"/")
        out.add(_decode(id_b), _decode(head) if sep else None)
    if progress is not None:
        progress(len(out))
    return out.build()


class _FolderWalk:
    """The columns a folder walk fills, and the classification of a folder's entries."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.blob = bytearray()
        self.ends = array("Q")
        self.labels = array("i")
        self.label_table: list[str] = []
        self.skipped: list[Skipped] = []
        self.seen = self.found = 0  # entries examined, image files found (for progress)
        self.next_report = PROGRESS_EVERY

    def emit(self, files: list[bytes], start: int, stop: int, prefix: bytes, label: int) -> None:
        """Appends the ids ``prefix + files[start:stop]``."""
        if start >= stop:
            return
        run = files[start:stop] if start or stop < len(files) else files
        lengths = [len(n) + len(prefix) for n in run]
        lengths[0] += len(self.blob)
        self.blob += prefix + prefix.join(run) if prefix else b"".join(run)
        self.ends.extend(accumulate(lengths))
        self.labels.extend(array("i", [label]) * len(run))

    def scan(self, dir_b: bytes, prefix: bytes) -> tuple[list[bytes], list[bytes]]:
        """Sorted image file names, and sorted subfolder names each followed by ``/``."""
        files: list[bytes] = []
        dirs: list[bytes] = []
        with os.scandir(dir_b) as it:
            while chunk := list(islice(it, PROGRESS_EVERY)):
                try:
                    self._classify_plain(chunk, prefix, files, dirs)
                except OSError:  # a file system without file types in its listings, and a failing lstat
                    self._classify_each(chunk, prefix, files, dirs)
                self.seen += len(chunk)
                if self.progress is not None and self.seen >= self.next_report:
                    self.progress(self.found + len(files))
                    self.next_report = (self.seen // PROGRESS_EVERY + 1) * PROGRESS_EVERY
        self.found += len(files)
        files.sort()
        dirs.sort()
        return files, dirs

    def _classify_plain(self, chunk: list[os.DirEntry], prefix: bytes, files: list, dirs: list) -> None:
        """Whole-chunk comprehensions over entries that are not links (their type costs no system call);
        links go one by one through ``_classify_each``."""
        exts = _IMAGE_EXTENSIONS_B
        links = [e for e in chunk if e.is_symlink()]
        if links:
            chunk = [e for e in chunk if not e.is_symlink()]
        new_dirs = [n + b"/" for e in chunk if (n := e.name)[:1] != b"." and e.is_dir()]
        images = [e for e in chunk if (n := e.name)[n.rfind(b".") :].lower() in exts and n[:1] != b"."]
        new_files = [e.name for e in images if e.is_file()]
        if len(new_files) + len(new_dirs) < len(images):  # an image name that is not a file nor a folder
            for e in images:
                if not e.is_file() and not e.is_dir():
                    self.skipped.append(Skipped(os.fsdecode(prefix + e.name), "not a file", None, "not a regular file"))
        files += new_files
        dirs += new_dirs
        if links:
            self._classify_each(links, prefix, files, dirs)

    def _classify_each(self, entries: list[os.DirEntry], prefix: bytes, files: list, dirs: list) -> None:
        exts = _IMAGE_EXTENSIONS_B
        for entry in entries:
            name = entry.name
            if name[:1] == b".":
                continue
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError as exc:  # a link that cannot be resolved: a cycle of links, a denied target
                self.skipped.append(_skipped_link(entry, prefix, exc))
                continue
            if is_dir:
                dirs.append(name + b"/")
                continue
            dot = name.rfind(b".")
            if dot > 0 and name[dot:].lower() in exts:
                if entry.is_file():
                    files.append(name)
                elif entry.is_symlink():
                    self.skipped.append(_skipped_link(entry, prefix))
                else:
                    self.skipped.append(Skipped(os.fsdecode(prefix + name), "not a file", None, "not a regular file"))
            elif entry.is_symlink() and not entry.is_file():  # a link to something gone, a folder perhaps
                self.skipped.append(_skipped_link(entry, prefix))


def _readlink(path: bytes) -> str | None:
    try:
        return os.fsdecode(os.readlink(path))
    except OSError:  # not a link (a bind mount, say)
        return None


def _skipped_link(entry: os.DirEntry, prefix: bytes, exc: OSError | None = None) -> Skipped:
    message = (exc.strerror or str(exc)) if exc is not None else "target does not exist"
    return Skipped(os.fsdecode(prefix + entry.name), "broken link", _readlink(entry.path), message)


_SKIP_WORDS = {
    "loop": ("directory link that loops back", "directory links that loop back"),
    "broken link": ("broken link", "broken links"),
    "unreadable": ("unreadable folder", "unreadable folders"),
    "not a file": ("entry that is not a regular file", "entries that are not regular files"),
}


def format_skipped(skipped: Sequence[Skipped]) -> str | None:
    """One line about what a folder listing skipped, or None when it skipped nothing::

    skipped 2 directory links that loop back (e.g. a/b -> ..), 1 broken link (e.g. c/x.jpg -> gone.jpg)
    """
    parts = []
    for reason, (one, many) in _SKIP_WORDS.items():
        group = [s for s in skipped if s.reason == reason]
        if group:
            s = group[0]
            example = f"{s.path} -> {s.target}" if s.target is not None else f"{s.path}: {s.message}"
            parts.append(f"{len(group)} {one if len(group) == 1 else many} (e.g. {example})")
    return "skipped " + ", ".join(parts) if parts else None


# ---------------------------------------------------------------------------------------------
# List files


def _read_list(list_path: str, progress: Progress | None = None) -> ItemList:
    remote = storage.is_remote(list_path)
    base = storage.parent(list_path) if remote else os.path.dirname(os.path.abspath(list_path))
    ext = os.path.splitext(storage.basename(list_path))[1].lower()
    out = _Builder(base, "uri" if remote else "abspath", progress)
    header: tuple[int, int | None] | None = None  # (path column, label column) named by a header row
    first = True
    if remote:
        try:
            text = storage.read_bytes(list_path).decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"cannot read list file {storage.display(list_path)}: {storage.describe(exc)}") from None
        lines = io.StringIO(text, newline="")
    else:
        lines = open(list_path, encoding="utf-8-sig", newline="")  # -sig: a spreadsheet's byte-order mark
    with lines as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{storage.display(list_path) if remote else list_path}:{lineno}"
            if ext == ".csv" or (ext == ".tsv" or "\t" in line):
                fields = next(csv.reader([line])) if ext == ".csv" else line.split("\t")
                fields = [x.strip() for x in fields]
                if first and ext in (".csv", ".tsv") and fields[0].lower() in _HEADER_PATH_NAMES:
                    header = _header_columns(fields)
                    first = False
                    continue
                rel, label = _pick_fields(fields, header, where, ext)
            else:
                rel, label = _split_spaces(line, base, where)
            first = False
            if not rel:
                raise SourceError(f"{where}: empty path")
            try:
                out.add(rel, label)
            except KeyError:
                raise SourceError(f"{where}: duplicate path {rel!r} (ids must be unique)") from None
    if progress is not None:
        progress(len(out))
    return out.build()


def _header_columns(fields: list[str]) -> tuple[int, int | None]:
    names = [x.lower() for x in fields]
    label = names.index("label") if "label" in names else (1 if len(names) > 1 else None)
    return 0, label


def _pick_fields(
    fields: list[str], header: tuple[int, int | None] | None, where: str, ext: str
) -> tuple[str, str | None]:
    if header is not None:
        path_col, label_col = header
        rel = fields[path_col] if path_col < len(fields) else ""
        label = fields[label_col] if label_col is not None and label_col < len(fields) else ""
        return rel, label or None
    if len(fields) > 2:
        sep = "comma" if ext == ".csv" else "tab"
        raise SourceError(
            f"{where}: {len(fields)} {sep}-separated fields, expected path{',' if sep == 'comma' else '<TAB>'}label; "
            f"quote fields that hold a {sep}, or start the file with a header row naming the columns (path, label)"
        )
    return fields[0], (fields[1] or None) if len(fields) > 1 else None


def _split_spaces(line: str, base: str, where: str) -> tuple[str, str | None]:
    """A ``.txt``/``.lst`` line without a tab: ``path`` or ``path label`` when that is the only reading."""
    line = line.strip()
    parts = line.rsplit(None, 1)
    if len(parts) == 1:
        return line, None  # one token
    # A path may itself contain spaces: the whole line is the path when that file exists.
    if storage.is_remote(base):  # a remote list: its relative paths are keys under its folder
        if storage.exists(storage.join(base, line)):
            return line, None
    elif os.path.exists(os.path.join(base, line)):
        return line, None
    path, label = parts
    if not any(c.isspace() for c in path) or storage.is_file(storage.join(base, path)):
        return path, label
    raise SourceError(
        f"{where}: ambiguous line {line!r}: neither the whole line nor {path!r} is an existing file, so "
        "it cannot be told which spaces belong to the path and which to the label; separate path and label "
        "with a tab, or use a .tsv or .csv list (path,label)"
    )


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards and Parquet files


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


def source_kind(source: str) -> str:
    remote = storage.is_remote(source)
    lower = (source.partition("?")[0] if remote else source).lower()  # a URI's options are not its name
    if lower.endswith(".tar"):
        return "webdataset"
    if lower.endswith(".parquet"):
        return "parquet"
    if storage.is_dir(source) if remote else os.path.isdir(source):
        return "folder"
    return "list"


def list_items(source: str, image_column: str = "image", *, progress: Progress | None = None) -> ItemList:
    """All images of ``source`` in order; raises SourceError for a missing or empty source.

    ``progress(n)``, if given, is called with the number of images found so far about every
    :data:`PROGRESS_EVERY` entries examined, and once at the end with the total.  What a folder
    listing skipped (looping folder links, broken links, unreadable folders) is in
    ``result.skipped``; :func:`format_skipped` makes one line of it.
    """
    source = storage.local_path(source)
    if storage.is_remote(source):
        try:
            return _list_remote(source, image_column, progress)
        except OSError as exc:  # the store refused or could not be reached
            raise SourceError(f"cannot read source {storage.display(source)}: {storage.describe(exc)}") from None
    kind = source_kind(source)
    if kind in ("webdataset", "parquet"):
        paths = expand_braces(source)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise SourceError(f"source does not exist: {missing[0]}")
        if kind == "webdataset":
            items = _read_tars(paths, progress)
        else:
            items = _read_parquets(paths, image_column, progress)
    elif not os.path.exists(source):
        raise SourceError(f"source does not exist: {source}")
    elif kind == "folder":
        items = _walk_folder(source, progress)  # ids are distinct relative paths by construction
    elif os.path.splitext(source)[1].lower() in LIST_EXTENSIONS:
        items = _read_list(source, progress)
    else:
        raise SourceError(
            f"source must be a folder, a list file ({', '.join(sorted(LIST_EXTENSIONS))}), .tar shards or .parquet files: {source}"
        )
    if not len(items):
        extra = format_skipped(items.skipped)
        raise SourceError(f"source has no images: {source}" + (f" ({extra})" if extra else ""))
    return items


def _list_remote(source: str, image_column: str, progress: Progress | None) -> ItemList:
    """``list_items`` for a URI: the same kinds of source, read through pyarrow.fs."""
    storage.check_bucket(source)
    kind = source_kind(source)
    if kind in ("webdataset", "parquet"):
        paths = expand_braces(source)
        missing = [p for p in paths if not storage.is_file(p)]
        if missing:
            raise SourceError(f"source does not exist: {storage.display(missing[0])}")
        items = _read_tars(paths, progress) if kind == "webdataset" else _read_parquets(paths, image_column, progress)
    elif kind == "folder":
        items = _walk_remote_folder(source, progress)
    elif not storage.is_file(source):
        raise SourceError(f"source does not exist: {storage.display(source)}")
    elif os.path.splitext(storage.basename(source))[1].lower() in LIST_EXTENSIONS:
        items = _read_list(source, progress)
    else:
        raise SourceError(
            f"source must be a folder, a list file ({', '.join(sorted(LIST_EXTENSIONS))}), .tar shards or .parquet files: "
            f"{storage.display(source)}"
        )
    if not len(items):
        raise SourceError(f"source has no images: {storage.display(source)}")
    return items


def _with_path(exc: OSError, what: str) -> OSError:
    """``exc`` again, as the same OSError subclass, with ``what`` it tried to read in its strerror."""
    reason = exc.strerror or str(exc)
    if exc.errno is not None:
        return OSError(exc.errno, f"{reason}: {what}")  # OSError(errno, ...) picks FileNotFoundError & co.
    return OSError(f"{reason}: {what}")


class ItemReader:
    """Reads an item's encoded bytes; keeps the current Parquet row group (items come in order).

    Every failure is an OSError whose ``strerror`` names what was read: the file, the tar shard
    and member, or the Parquet file and row."""

    def __init__(self, image_column: str = "image"):
        self.image_column = image_column
        self._files: dict[str, object] = {}
        self._group: tuple[str, int, int, list] | None = None  # (path, first row, end row, values)
        self._remote_tar: tuple[str, object] | None = None  # (URI, open file) of the current remote tar shard

    def read(self, item: Item) -> bytes:
        if item.error:
            raise OSError(item.error)
        if "://" in item.path and storage.is_remote(item.path):
            return self._read_remote(item)
        if item.size is not None:  # tar member
            what = f"{item.path!r} (tar member {item.id!r} at byte {item.offset})"
            if item.size > MAX_FILE_BYTES:
                raise OSError(f"file too large: {item.size} bytes (limit {MAX_FILE_BYTES}): {what}")
            try:
                with open(item.path, "rb") as f:
                    f.seek(item.offset)
                    data = f.read(item.size)
            except OSError as exc:
                raise _with_path(exc, what) from None
            if len(data) != item.size:
                raise OSError(f"truncated tar member: {len(data)} of {item.size} bytes: {what}")
            return data
        if item.offset is not None:  # Parquet row
            return self._parquet_bytes(item.path, item.offset)
        what = repr(item.path)
        try:
            with open(item.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                data = f.read() if size <= MAX_FILE_BYTES else None
        except OSError as exc:
            raise _with_path(exc, what) from None
        if data is None:
            raise OSError(f"file too large: {size} bytes (limit {MAX_FILE_BYTES}): {what}")
        return data

    def _read_remote(self, item: Item) -> bytes:
        """An object: one GET (a tar member: one ranged GET on the shard, kept open while its members come)."""
        where = repr(storage.display(item.path))
        if item.offset is not None and item.size is None:  # Parquet row
            return self._parquet_bytes(item.path, item.offset)
        try:
            if item.size is not None:
                what = f"{where} (tar member {item.id!r} at byte {item.offset})"
                if item.size > MAX_FILE_BYTES:
                    raise OSError(f"file too large: {item.size} bytes (limit {MAX_FILE_BYTES})")
                if self._remote_tar is None or self._remote_tar[0] != item.path:
                    self._remote_tar = (item.path, storage.open_input_file(item.path))
                data = self._remote_tar[1].read_at(item.size, item.offset)
                if len(data) != item.size:
                    raise OSError(f"truncated tar member: {len(data)} of {item.size} bytes")
                return data
            what = where
            data = storage.read_bytes(item.path, limit=MAX_FILE_BYTES)
        except OSError as exc:
            raise OSError(f"{storage.describe(exc)}: {what}") from None
        if len(data) > MAX_FILE_BYTES:
            raise OSError(f"file too large: over {MAX_FILE_BYTES} bytes (the limit): {what}")
        return data

    def _parquet_bytes(self, path: str, row: int) -> bytes:
        import pyarrow.parquet as pq

        what = f"{storage.display(path)!r} row {row}" if "://" in path else f"{path!r} row {row}"
        g = self._group
        if g is None or g[0] != path or not g[1] <= row < g[2]:
            self._group = g = None
            try:
                pf = self._files.get(path) or pq.ParquetFile(
                    storage.open_input_file(path) if "://" in path and storage.is_remote(path) else path
                )
                self._files = {path: pf}
                start = 0
                for i in range(pf.metadata.num_row_groups):
                    n = pf.metadata.row_group(i).num_rows
                    if row < start + n:
                        values = pf.read_row_group(i, columns=[self.image_column]).column(0).to_pylist()
                        self._group = g = (path, start, start + n, values)
                        break
                    start += n
            except OSError as exc:
                raise _with_path(exc, what) from None
            except Exception as exc:  # pyarrow's own errors (ArrowInvalid, ...) for a damaged file
                raise OSError(f"{type(exc).__name__}: {exc}: {what}") from None
            if g is None:
                raise OSError(f"no such row (the file has {start} rows): {what}")
        value = g[3][row - g[1]]
        if isinstance(value, dict):
            value = value.get("bytes")
        if not value:
            raise OSError(f"empty image bytes: {what}")
        if len(value) > MAX_FILE_BYTES:
            raise OSError(f"image too large: {len(value)} bytes (limit {MAX_FILE_BYTES}): {what}")
        return value
