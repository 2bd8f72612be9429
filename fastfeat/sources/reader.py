"""Reading an item's encoded bytes: a file, a tar member or a Parquet row, local or on object storage."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

from .. import storage
from ..faults import (
    CORRUPT,
    DEFAULT_BACKOFF,
    DEFAULT_READ_RETRIES,
    MISSING,
    NOT_IMAGE,
    TOO_LARGE,
    UNSAFE,
    Backoff,
    ImageUnreadable,
    ReadFault,
    is_transient,
    with_retries,
)
from .items import Item

# Encoded files above this are refused unread: no JPEG/PNG a CNN should see is this large.
MAX_FILE_BYTES = 1 << 30


def _with_path(exc: OSError, what: str) -> OSError:
    """``exc`` again, as the same OSError subclass, with ``what`` it tried to read in its strerror."""
    reason = exc.strerror or str(exc)
    if exc.errno is not None:
        return OSError(exc.errno, f"{reason}: {what}")  # OSError(errno, ...) picks FileNotFoundError & co.
    return OSError(f"{reason}: {what}")


class ItemReader:
    """Reads an item's encoded bytes; keeps the current Parquet row group (items come in order).

    Every failure is an OSError whose ``strerror`` names what was read: the file, the tar shard
    and member, or the Parquet file and row.  A failure of the image's own (fastfeat.faults: not found,
    not an image, corrupt, too large) is raised at once, with its ``cause`` when it is an
    :class:`~fastfeat.faults.ImageUnreadable`; a transient one (a store briefly down, a timeout, EIO) is
    retried up to ``retries`` times with ``backoff`` (``sleep`` waits; default ``fastfeat.faults.sleep``);
    what still fails, or fails for another reason (permission denied), raises
    :class:`~fastfeat.faults.ReadFault`.  Once a read has failed so, the next ones get a single try each
    until one succeeds: a store that is down costs one backoff, not one per image."""

    def __init__(
        self, image_column: str = "image", retries: int = DEFAULT_READ_RETRIES, backoff: Backoff = DEFAULT_BACKOFF,
        sleep: Callable[[float], None] | None = None, rng: random.Random | None = None,
    ):  # fmt: skip
        if retries < 0:
            raise ValueError(f"retries must be at least 0, got {retries}")
        self.image_column, self.retries, self.backoff, self.sleep = image_column, retries, backoff, sleep
        self._rng = rng or random.Random()
        self._failing = False  # the last read raised ReadFault: no retries until a read succeeds
        self._files: dict[str, object] = {}
        self._group: tuple[str, int, int, list] | None = None  # (path, first row, end row, values)
        self._remote_tar: tuple[str, object] | None = None  # (URI, open file) of the current remote tar shard

    def read(self, item: Item) -> bytes:
        """The item's bytes; raises ImageUnreadable (or FileNotFoundError...) or ReadFault (see the class)."""
        retries = 0 if self._failing else self.retries
        try:
            data = with_retries(lambda: self._read_once(item), retries, self.backoff, self._rng, self.sleep)
        except ReadFault:
            self._failing = True
            raise
        self._failing = False
        return data

    def _forget(self) -> None:
        """Drop open handles and cached row groups: a retry after a failure opens everything again."""
        self._files, self._group, self._remote_tar = {}, None, None

    def _read_once(self, item: Item) -> bytes:
        try:
            return self._read(item)
        except OSError as exc:
            if not isinstance(exc, ImageUnreadable):
                self._forget()
            raise

    def _read(self, item: Item) -> bytes:
        if item.error:
            raise ImageUnreadable(item.error, UNSAFE)
        if "://" in item.path and storage.is_remote(item.path):
            return self._read_remote(item)
        if item.size is not None:  # tar member
            what = f"{item.path!r} (tar member {item.id!r} at byte {item.offset})"
            if item.size > MAX_FILE_BYTES:
                raise ImageUnreadable(f"file too large: {item.size} bytes (limit {MAX_FILE_BYTES}): {what}", TOO_LARGE)
            try:
                with open(item.path, "rb") as f:
                    f.seek(item.offset)
                    data = f.read(item.size)
            except OSError as exc:
                raise _with_path(exc, what) from None
            if len(data) != item.size:
                raise ImageUnreadable(f"truncated tar member: {len(data)} of {item.size} bytes: {what}", CORRUPT)
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
            raise ImageUnreadable(f"file too large: {size} bytes (limit {MAX_FILE_BYTES}): {what}", TOO_LARGE)
        return data

    def close(self) -> None:
        """Close the open remote tar shard and Parquet files (the reader can still be used: it reopens)."""
        self._close_remote_tar()
        self._files, self._group = {}, None

    def _close_remote_tar(self) -> None:
        if self._remote_tar is not None:
            tar, self._remote_tar = self._remote_tar[1], None
            tar.close()

    def _read_remote(self, item: Item) -> bytes:
        """An object: one GET (a tar member: one ranged GET on the shard, kept open while its members come)."""
        where = repr(storage.display(item.path))
        if item.offset is not None and item.size is None:  # Parquet row
            return self._parquet_bytes(item.path, item.offset)
        what = where
        try:
            if item.size is not None:
                what = f"{where} (tar member {item.id!r} at byte {item.offset})"
                if item.size > MAX_FILE_BYTES:
                    raise ImageUnreadable(f"file too large: {item.size} bytes (limit {MAX_FILE_BYTES})", TOO_LARGE)
                if self._remote_tar is None or self._remote_tar[0] != item.path:
                    self._close_remote_tar()  # the previous shard's: items come shard after shard
                    self._remote_tar = (item.path, storage.open_input_file(item.path))
                data = self._remote_tar[1].read_at(item.size, item.offset)
                if len(data) != item.size:
                    raise ImageUnreadable(f"truncated tar member: {len(data)} of {item.size} bytes", CORRUPT)
                return data
            data = storage.read_bytes(item.path, limit=MAX_FILE_BYTES)
        except OSError as exc:
            if isinstance(exc, ImageUnreadable):
                raise ImageUnreadable(f"{exc}: {what}", exc.cause) from None
            reason = storage.describe(exc)
            raise (OSError(exc.errno, f"{reason}: {what}") if exc.errno else OSError(f"{reason}: {what}")) from None
        if len(data) > MAX_FILE_BYTES:
            raise ImageUnreadable(f"file too large: over {MAX_FILE_BYTES} bytes (the limit): {what}", TOO_LARGE)
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
                if exc.errno is None and not is_transient(exc) and not storage.is_remote(path):
                    # pyarrow's OSError for a damaged local file ("Couldn't deserialize thrift"): its content
                    raise ImageUnreadable(f"{type(exc).__name__}: {exc}: {what}", CORRUPT) from None
                raise _with_path(exc, what) from None
            except Exception as exc:  # pyarrow's own errors (ArrowInvalid, ...) for a damaged file
                raise ImageUnreadable(f"{type(exc).__name__}: {exc}: {what}", CORRUPT) from None
            if g is None:
                raise ImageUnreadable(f"no such row (the file has {start} rows): {what}", MISSING)
        value = g[3][row - g[1]]
        if isinstance(value, dict):
            value = value.get("bytes")
        if not value:
            raise ImageUnreadable(f"empty image bytes: {what}", NOT_IMAGE)
        if len(value) > MAX_FILE_BYTES:
            raise ImageUnreadable(f"image too large: {len(value)} bytes (limit {MAX_FILE_BYTES}): {what}", TOO_LARGE)
        return value
