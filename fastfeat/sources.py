"""Enumerate the images of a source in a deterministic order.

fastfeat owns ids, order and labels (DALI only ever sees bytes through
``external_source``):

* a folder, walked recursively; an image's id is its path relative to the folder
  (with ``/`` separators) and its label is the first-level subfolder name, if any;
* a list file (``.txt``/``.lst``/``.csv``/``.tsv``): one path per line, optionally
  followed by a label (tab- or whitespace-separated).  Relative paths are resolved
  against the list file's folder and the id is the path as written.  Blank lines
  and lines starting with ``#`` are skipped.

Order: folders are sorted by id (byte order of the UTF-8 path), list files keep
their line order.  Both are the same on every run and every machine.
"""

from __future__ import annotations

import os
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
    path: str  # absolute path on disk
    label: str | None


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
    with open(list_path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
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


def list_items(source: str) -> list[Item]:
    """All images of ``source`` in order; raises SourceError for a missing or empty source."""
    if not os.path.exists(source):
        raise SourceError(f"source does not exist: {source}")
    if os.path.isdir(source):
        items = _walk_folder(source)
    elif os.path.splitext(source)[1].lower() in LIST_EXTENSIONS:
        items = _read_list(source)
    else:
        raise SourceError(f"source must be a folder or a list file ({', '.join(sorted(LIST_EXTENSIONS))}): {source}")
    if not items:
        raise SourceError(f"source has no images: {source}")
    return items
