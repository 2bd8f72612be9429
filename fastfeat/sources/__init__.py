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

import os

from .. import storage
from .containers import MAX_LABEL_BYTES, TAR_IMAGE_EXTENSIONS, _read_parquets, _read_tars, expand_braces
from .folder import _walk_folder, _walk_remote_folder, format_skipped
from .items import IMAGE_EXTENSIONS, LIST_EXTENSIONS, PROGRESS_EVERY, Item, ItemList, Progress, Skipped, SourceError
from .listfile import _read_list
from .reader import MAX_FILE_BYTES, ItemReader

__all__ = [
    "IMAGE_EXTENSIONS",
    "LIST_EXTENSIONS",
    "MAX_FILE_BYTES",
    "MAX_LABEL_BYTES",
    "PROGRESS_EVERY",
    "TAR_IMAGE_EXTENSIONS",
    "Item",
    "ItemList",
    "ItemReader",
    "Progress",
    "Skipped",
    "SourceError",
    "expand_braces",
    "format_skipped",
    "list_items",
    "source_kind",
]


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
