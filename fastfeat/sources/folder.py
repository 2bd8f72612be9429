"""Folders, local and remote: walked in id order, with what the walk skipped (:func:`format_skipped`)."""

from __future__ import annotations

import os
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from itertools import accumulate, islice

from .. import storage
from .items import (
    IMAGE_EXTENSIONS,
    PROGRESS_EVERY,
    ItemList,
    Progress,
    Skipped,
    SourceError,
    _Builder,
    _compact_ends,
    _decode,
    _encode,
    _small_codes,
)

_IMAGE_EXTENSIONS_B = frozenset(e.encode() for e in IMAGE_EXTENSIONS)


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
