"""One shard written exactly once: temp files, fsync, checksum, rename (or upload), then the manifest."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from .. import storage
from ..checksum import file_sha256
from ..sinks.base import Rows, Sink
from .layout import _fsync_dir, _remove_orphan_tmp, tmp_name
from .manifest import OutputDir, ShardRecord


class ShardTransaction:
    """Writes one shard through a sink into ``<file>.<pid>@<host>.tmp`` files, and commits it when complete:
    fsync, checksum, rename, then the manifest.  ``abort`` leaves nothing behind.

    ``commit`` records the finished shard; by default ``out.commit_shard`` (this process writes the
    manifest).  A worker of a distributed run passes its own, handing the record to the one driver
    that writes the manifest."""

    def __init__(
        self, out: OutputDir, sink: Sink, index: int, first_item: int, end_item: int,
        commit: Callable[[ShardRecord], None] | None = None,
    ):  # fmt: skip
        self.out, self.index, self.first_item, self.end_item = out, index, first_item, end_item
        self._commit = commit if commit is not None else out.commit_shard
        # Unique per writing process: a stray second writer of the same shard (a part restarted while
        # the old one still runs) can never write into these files.  Same content either way: the
        # output is deterministic, so whichever rename lands last is correct.
        # An object store has no rename: the files are staged on this host and uploaded on close.
        folder = out.staging_dir() if out.remote else out.path
        if out.remote:
            os.makedirs(folder, exist_ok=True)
            _remove_orphan_tmp(folder)  # staged by a killed process on this host (a Ray worker's host too)
        self.tmp_paths = {name: os.path.join(folder, tmp_name(name)) for name in sink.shard_files(index)}
        self.errors: list[dict] = []
        self.warnings: list[dict] = []
        try:
            self._writer = sink.open(self.tmp_paths)
        except BaseException:  # no transaction to abort: remove what the sink created before failing
            self._remove_tmp()
            raise

    def add(self, rows: Rows) -> None:
        self._writer.add(rows)

    def add_errors(self, errors: list[dict]) -> None:
        self.errors.extend(errors)

    def add_warnings(self, warnings: list[dict]) -> None:
        self.warnings.extend(warnings)

    def close(self) -> ShardRecord:
        rows = self._writer.close()
        files = []
        for name, tmp in self.tmp_paths.items():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            # Checksum and size of the file this process wrote, taken before it becomes visible.
            files.append({"file": name, "sha256": file_sha256(tmp), "bytes": os.path.getsize(tmp)})
        primary = files[0]
        record = ShardRecord(
            self.index, primary["file"], rows, self.first_item, self.end_item, primary["sha256"], primary["bytes"],
            self.errors, self.warnings, files[1:],
        )  # fmt: skip
        if self.out.remote:
            # One PUT per file to its final key (atomic; a retry rewrites the same bytes), then the manifest.
            for name, tmp in self.tmp_paths.items():
                storage.upload(tmp, storage.join(self.out.path, name))
                os.unlink(tmp)
            self._commit(record)
            return record
        for name, tmp in self.tmp_paths.items():
            os.replace(tmp, os.path.join(self.out.path, name))
        _fsync_dir(self.out.path)
        self._commit(record)
        return record

    def abort(self) -> None:
        try:
            self._writer.abort()
        finally:
            self._remove_tmp()

    def _remove_tmp(self) -> None:
        for tmp in self.tmp_paths.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
