"""The files of an output directory: their names, the temp names shards are written under, atomic writes."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
from collections.abc import Callable

from .. import storage
from ..errors import FastfeatError

MANIFEST = "manifest.json"
LOCK = ".lock"  # flock'd while the manifest is read-merged-written: several processes share one OUT
ERRORS = "errors.parquet"
SUMMARY = "summary.json"
FORMAT = "fastfeat/1"
SHARD_RE = re.compile(r"^part-\d{5,}\.")  # every file of a shard, whatever the format, and their temp files
# <pid>@<host>: a pid names a process on one host only, and an output folder may be shared by several
# hosts (a Ray run's workers).  Files without "@<host>" are from older versions, written on this host.
TMP_RE = re.compile(r"^part-\d{5,}\..+\.(\d+)(?:@([A-Za-z0-9-]+))?\.tmp$")
ITEMS_RE = re.compile(r"^items-\d{5,}\.arrow$")  # each generation's (id, label) list, in order (Arrow IPC)


class OutputError(FastfeatError):
    pass


def _atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; the manifest is for every reader
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def host_tag() -> str:
    """This host's name as it appears in temp file names (letters, digits and ``-`` only)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


def tmp_name(name: str, pid: int | None = None) -> str:
    """The temp file name this process (or ``pid`` on this host) writes shard file ``name`` under."""
    return f"{name}.{os.getpid() if pid is None else pid}@{host_tag()}.tmp"


def remove_tmp_of(folder: str, writers: set[tuple[str, int]]) -> None:
    """Delete the shard temp files written by ``writers`` ((host tag, pid) pairs the caller knows are dead:
    a Ray driver's own killed workers, on any host)."""
    if storage.is_remote(storage.local_path(folder)):
        return  # nothing is staged on an object store: each host removes its dead writers' local staging files
    for entry in os.listdir(folder):
        m = TMP_RE.match(entry)
        if m and (m.group(2), int(m.group(1))) in writers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, entry))


def _remove_orphan_tmp(folder: str) -> None:
    """Delete shard temp files whose writing process no longer exists (a killed run's partial shard).

    Only this host's: another host's pid cannot be checked from here, so its files are left alone
    (a Ray driver removes its own dead workers' files, see remove_tmp_of)."""
    here = host_tag()
    for entry in os.listdir(folder):
        m = TMP_RE.match(entry)
        if not m or m.group(2) not in (None, here):
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # that process is alive: a sibling part is writing it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, owned by another user
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, entry))


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _upload_written(location: str, write: Callable[[str], None]) -> None:
    """Object stores: ``write(local_path)`` a whole file on this host, then upload it in one atomic PUT."""
    with tempfile.TemporaryDirectory(prefix="fastfeat-") as folder:
        local = os.path.join(folder, storage.basename(location))
        write(local)
        storage.upload(local, location)


def _file_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None
