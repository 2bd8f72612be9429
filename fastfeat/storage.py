"""Where sources and output directories live: a local path, or a URI read and written through ``pyarrow.fs``.

A *location* is a string.  Plain paths (``/data/out``, ``out``) are local and every caller keeps its own
``os``-based code for them (``os.scandir`` listing, ``flock``, ``rename``, ``fsync``): nothing here is on
the local path's way.  ``file:///data/out`` is turned into the local path ``/data/out`` by
:func:`local_path` at the entry points, so it takes the local code too.  Every other URI (``s3://``,
``gs://``, ``hdfs://``: whatever ``pyarrow.fs.FileSystem.from_uri`` accepts) is *remote* and goes through
the functions below.

Query parameters of a URI configure its file system, as pyarrow reads them
(``s3://bucket/run?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1``).  They stay on every
location derived from it (:func:`join` inserts names before the ``?``), and one file system object is made
per scheme, host and query, then reused.  Credentials and the endpoint can also come from the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``, or
``GOOGLE_APPLICATION_CREDENTIALS``), which keeps them out of the URI and so out of logs and manifests.
An object key is the URI's path as written (no percent-decoding); a key holding ``?`` cannot be named.

**Atomic writes, also when the process fails.** An object upload is atomic (a reader sees the whole old
object, the whole new one, or none), but pyarrow's output stream publishes the object when it is closed,
and it is closed also when the ``with`` block exits on an exception (a Ctrl-C between open and write) or
when the stream is garbage collected (apache/arrow#40502; pyarrow has no way to abort the upload).  So
:func:`upload` and :func:`write_bytes` never write the final key with a stream: the data goes to a
``.tmp-<random>-<name>`` key in the same folder first, then a server-side copy (S3 CopyObject) or move
publishes it whole, and the temp key is deleted.  An exception deletes the temp key; a process killed
outright may leave one behind, which is never read (no reader or manifest names ``.tmp-*``) and which
:func:`remove_temp_objects` deletes when the output is next opened.  HDFS gets the same temp name and an
atomic rename.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import uuid
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from .errors import FastfeatError

# Stores whose uploads become visible whole and only when complete: writing to the final key is atomic.
ATOMIC_PUT_SCHEMES = frozenset({"s3", "gs", "gcs"})
# Stores whose paths start with the bucket (the URI's host): "s3://bucket/key" is "bucket/key" to pyarrow.
BUCKET_SCHEMES = ATOMIC_PUT_SCHEMES
# Stores whose URI host names a cluster and whose paths are absolute: "hdfs://nn:8020/x" is "/x" there.
HOST_SCHEMES = frozenset({"hdfs", "viewfs"})
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
UPLOAD_CHUNK = 8 << 20


class StorageError(FastfeatError):
    """A URI that cannot be used (unknown scheme, unreachable endpoint, missing bucket): one line, exit 2."""


def scheme(location: str) -> str | None:
    """``"s3"`` for ``s3://...``, None for a plain path."""
    m = _SCHEME_RE.match(location)
    return m.group(1).lower() if m else None


def is_remote(location: str) -> bool:
    """True for a URI other than ``file://``: read and written through pyarrow.fs, not os."""
    s = scheme(location)
    return s is not None and s != "file"


def local_path(location: str) -> str:
    """A ``file://`` URI as the local path it names; anything else unchanged."""
    if scheme(location) != "file":
        return location
    parts = urlsplit(location)
    if parts.netloc not in ("", "localhost"):
        raise StorageError(f"file:// URI names another host ({parts.netloc}); use a path on this machine: {location}")
    return unquote(parts.path) or "/"


def _split_query(location: str) -> tuple[str, str]:
    base, _, query = location.partition("?")
    return base, query


def join(location: str, *names: str) -> str:
    """``location/name/...``; a URI keeps its query parameters at the end."""
    if not is_remote(location):
        return os.path.join(location, *names)
    base, query = _split_query(location)
    joined = base.rstrip("/") + "".join("/" + n.strip("/") for n in names)
    return joined + ("?" + query if query else "")


def parent(location: str) -> str:
    """The folder holding ``location``."""
    if not is_remote(location):
        return os.path.dirname(os.path.abspath(location))
    base, query = _split_query(location)
    head = base.rstrip("/").rsplit("/", 1)[0]
    return head + ("?" + query if query else "")


def basename(location: str) -> str:
    if not is_remote(location):
        return os.path.basename(location)
    return _split_query(location)[0].rstrip("/").rsplit("/", 1)[-1]


def display(location: str) -> str:
    """What to show and record: an absolute local path, or the URI without its query (it may hold keys)."""
    if not is_remote(location):
        return os.path.abspath(local_path(location))
    return _split_query(location)[0]


_filesystems: dict[tuple[str, str, str], pafs.FileSystem] = {}
_filesystems_lock = threading.Lock()


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) of a remote location; raises StorageError for one pyarrow cannot use."""
    base, query = _split_query(location)
    kind = (scheme(base) or "").lower()
    netloc, _, key_path = base[len(kind) + 3 :].partition("/")
    if kind not in BUCKET_SCHEMES | HOST_SCHEMES:
        return _from_uri(location)
    # One file system per bucket (or cluster) and options, made once: connecting costs a round trip.  The
    # path is "bucket/key" (or "/path") as written: no percent-decoding, no fragment ("#" and spaces are
    # key characters like any other).
    cache_key = (kind, netloc, query)
    with _filesystems_lock:
        fs = _filesystems.get(cache_key)
    if fs is None:
        fs = _from_uri(f"{kind}://{netloc}" + ("?" + query if query else ""), shown=location)[0]
        with _filesystems_lock:
            _filesystems[cache_key] = fs
    if kind in HOST_SCHEMES:
        return fs, "/" + key_path.rstrip("/")
    return fs, f"{netloc}/{key_path}".rstrip("/")


def _from_uri(location: str, shown: str | None = None) -> tuple[pafs.FileSystem, str]:
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (OSError, ValueError, TypeError) as exc:  # unknown scheme, bad query option, no libhdfs
        raise StorageError(f"cannot use {display(shown or location)}: {_first_line(exc)}") from None
    return fs, path.rstrip("/") or "/"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(exc: BaseException) -> str:
    """One line of a pyarrow/OS error, for messages."""
    return getattr(exc, "strerror", None) or _first_line(exc)


def info(location: str) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def is_file(location: str) -> bool:
    if not is_remote(location):
        return os.path.isfile(local_path(location))
    return info(location).type == pafs.FileType.File


def is_dir(location: str) -> bool:
    if not is_remote(location):
        return os.path.isdir(local_path(location))
    return info(location).type == pafs.FileType.Directory


def exists(location: str) -> bool:
    if not is_remote(location):
        return os.path.exists(local_path(location))
    return info(location).type != pafs.FileType.NotFound


def check_bucket(location: str) -> None:
    """Raises StorageError when the store cannot be reached or the bucket does not exist (before any write)."""
    if scheme(location) not in BUCKET_SCHEMES:
        return
    fs, path = resolve(location)
    bucket = path.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket).type
    except OSError as exc:
        raise StorageError(f"cannot reach {display(location)}: {describe(exc)}") from None
    if not bucket or found == pafs.FileType.NotFound:
        raise StorageError(f"bucket does not exist: {scheme(location)}://{bucket}")


def list_dir(location: str) -> dict[str, int | None]:
    """{name: size} of a remote folder's direct entries, size None for a subfolder; empty when there is
    no such folder.  Object stores list a prefix in pages of a thousand keys, one request per page."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    prefix = path.rstrip("/") + "/"
    return {
        i.path[len(prefix) :]: (i.size if i.type == pafs.FileType.File else None)
        for i in infos
        if i.path.startswith(prefix)
    }


def walk_files(location: str) -> list[str]:
    """Paths, relative to a remote folder ("/" separators), of every file under it, at any depth."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    prefix = path.rstrip("/") + "/"
    return [i.path[len(prefix) :] for i in infos if i.type == pafs.FileType.File and i.path.startswith(prefix)]


def read_bytes(location: str, limit: int | None = None) -> bytes:
    """The whole file (one GET on an object store); at most ``limit + 1`` bytes when a limit is given,
    so that a caller can tell an oversized file without reading all of it."""
    if not is_remote(location):
        with open(local_path(location), "rb") as f:
            return f.read() if limit is None else f.read(limit + 1)
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read() if limit is None else f.read(limit + 1)


def open_input_file(location: str):
    """A seekable file (pyarrow NativeFile) for ranged reads: ``read_at(size, offset)``, pyarrow readers."""
    fs, path = resolve(location)
    return fs.open_input_file(path)


TEMP_PREFIX = ".tmp-"  # temp keys of uploads in flight (or of a killed writer): never a final name


def _temp_path(path: str) -> str:
    """A fresh temp key beside ``path``: readers and manifests never name it, so it is never seen as data."""
    folder, _, name = path.rpartition("/")
    return f"{folder}/{TEMP_PREFIX}{uuid.uuid4().hex}-{name}"


def _publish(fs: pafs.FileSystem, written: str, path: str) -> None:
    """Make the complete temp object ``written`` appear whole at ``path``: on an object store a server-side
    copy (one CopyObject: atomic, no data through this host) then the temp's deletion; elsewhere a rename."""
    if isinstance(fs, pafs.S3FileSystem):
        fs.copy_file(written, path)
        fs.delete_file(written)
    else:
        fs.move(written, path)


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole remote file atomically (see the module docstring)."""
    _put(location, lambda out: out.write(data))


def _put(location: str, write) -> tuple:
    """``write(stream)`` the object at ``location`` atomically (see the module docstring); (fs, path).

    The stream writes a temp key, never ``location``: pyarrow publishes whatever a stream holds when it is
    closed, also on an exception, so only a stream whose writing completed is copied to the final key."""
    fs, path = resolve(location)
    target = _temp_path(path)
    try:
        with fs.open_output_stream(target) as out:
            write(out)
        _publish(fs, target, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(target)
        raise
    return fs, path


def upload(local_file: str, location: str) -> None:
    """Copy a local file to a remote location atomically (see the module docstring), then check that the
    stored object has the local file's size: an upload cut short is an error, never a silent success."""
    size = os.path.getsize(local_file)
    with open(local_file, "rb") as src:
        fs, path = _put(location, lambda out: shutil.copyfileobj(src, out, UPLOAD_CHUNK))
    stored = fs.get_file_info(path).size
    if stored != size:
        raise OSError(f"upload of {display(location)} stored {stored} of {size} bytes")


def download(location: str, local_file: str) -> None:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as src, open(local_file, "wb") as out:
        shutil.copyfileobj(src, out, UPLOAD_CHUNK)


def delete(location: str) -> None:
    fs, path = resolve(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def remove_temp_objects(location: str) -> list[str]:
    """Delete the ``.tmp-*`` objects directly under a remote folder (uploads of a writer that was killed
    before it could delete them); the names removed.  Only the folder's single writer may call this: it
    would also remove an upload in flight of another process."""
    removed = [name for name in list_dir(location) if name.startswith(TEMP_PREFIX)]
    for name in removed:
        delete(join(location, name))
    return removed


def make_dir(location: str) -> None:
    """Create a remote folder (and its parents); nothing on object stores, whose folders are key prefixes
    (pyarrow would add an empty ``folder/`` marker object)."""
    if scheme(location) in BUCKET_SCHEMES:
        return
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def check_single_writer(out: str, parts: int, flag: str = "--num-shards") -> None:
    """Refuse several processes (``parts`` > 1) sharing one output on a remote store: its manifest is
    read, merged and rewritten by each, and nothing there serialises that (no flock on an object store)."""
    if parts > 1 and is_remote(local_path(out)):
        from .errors import ConfigError

        raise ConfigError(
            f"{flag} parts cannot share an output on object storage ({display(out)}): there is no lock to merge "
            "their manifests; use --ray, whose driver alone writes the manifest"
        )
