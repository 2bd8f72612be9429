"""The output directory and its exactly-once protocol, whatever the format (fastfeat.sinks).

Layout of an output directory (``--format parquet``; see the sinks for the others)::

    OUT/part-00000.parquet   rows of items [0, S), S = --shard-size
    OUT/part-00001.parquet   rows of items [S, 2S) ...
    OUT/manifest.json        the run's configuration and every finished shard
    OUT/errors.parquet       id, stage, message of every image that was skipped
    OUT/summary.json         throughput and per-stage time of the last invocation

Shard k always covers the same slice of the input, whatever failed before, so a
run can be resumed shard by shard and its result equals an uninterrupted run.  Each file of a
shard is written as ``<name>.<pid>@<host>.tmp`` (``part-00000.parquet.4242@node1.tmp``), fsynced, checksummed
and renamed; only then is the shard added to the manifest, which is itself replaced atomically.
A shard is therefore either listed and complete, or not listed and redone.

**Object stores** (``--out s3://bucket/run``, ``gs://``; see fastfeat.storage) have no rename and no
``flock``.  There a shard's files are written exactly as above into a local staging folder (under
``$TMPDIR``: the npy sink rewrites its header on close, which needs a seekable local file), checksummed,
then each uploaded to its final, fixed key (``part-00007.parquet``; through a temp key and a server-side
copy, see fastfeat.storage), and only then added to the manifest, written the same way and last.  A final
key only ever receives a whole object, and a killed writer's temp keys and uncommitted shard objects are
deleted when the output is next opened, so the guarantee is the same: the manifest is the only
truth, ``verify`` and the readers go by it, and a shard not listed is redone.  Redoing it overwrites the
same key with the same bytes (the output is deterministic), so no second copy ever appears beside it.
The manifest must have a single writer there (no lock serialises read-merge-write): the CLI refuses
``--num-shards``/``--devices`` parts writing to an object store; ``--ray`` runs have one writer, the driver.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from . import storage
from .checksum import file_sha256
from .sinks import DEFAULT_FORMAT, get_sink
from .sinks.base import Layout, Rows, Sink

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


class OutputError(ValueError):
    pass


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def manifest_json(manifest: dict) -> str:
    """The manifest as indented JSON, one shard record per line.

    ``json.dumps(indent=...)`` runs the pure-Python encoder: 0.65 s for a 1,000-shard manifest with 10
    error records per shard, rewritten at every commit (benchmarks/ray_overhead.py --driver-costs).
    Records on one line each go through the C encoder; the file reads back as the same JSON."""
    head = json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=1)
    shards = ",\n  ".join(json.dumps(r, ensure_ascii=True) for r in manifest.get("shards", []))
    return head[:-2] + ',\n "shards": [' + (f"\n  {shards}\n ]" if shards else "]") + "\n}"


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


@dataclass
class ShardRecord:
    index: int
    file: str
    rows: int
    first_item: int
    end_item: int
    sha256: str
    bytes: int = 0  # file size: a truncated file is not taken as finished on resume
    errors: list[dict] = field(default_factory=list)  # skipped items: id, stage, message
    # Items kept despite a problem (recoverable corruption): id, stage, message.
    warnings: list[dict] = field(default_factory=list)
    # The shard's other files, for formats with several (npy): [{"file", "sha256", "bytes"}].
    extra_files: list[dict] = field(default_factory=list)

    def files(self) -> list[dict]:
        """Every file of the shard: the primary one first."""
        return [{"file": self.file, "sha256": self.sha256, "bytes": self.bytes}, *self.extra_files]


class OutputDir:
    """Owns OUT/: checks that it holds nothing or the same run, and records finished shards."""

    def __init__(self, path: str, config: dict, overwrite: bool = False):
        self.path = storage.local_path(path)  # file:///x is the local folder /x, with the local protocol
        # An object store (s3://, gs://, ...): shards staged locally, uploaded, no lock (see the docstring).
        self.remote = storage.is_remote(self.path)
        if self.remote:
            storage.check_bucket(self.path)  # a missing bucket or unreachable endpoint: one line, nothing written
        self.config = config
        self.hash = config_hash(config)
        self.overwrite = overwrite
        self.shards: dict[int, ShardRecord] = {}
        # Each extraction of new items (the first run, then every --append that found new ids):
        # {"items", "ids_labels_sha256", "first_item", "first_shard", "items_file"}.
        self.generations: list[dict] = []
        self.source: str | None = None  # where the items were listed from, for the record only
        self._check(self._read_manifest_if_any())

    # -- opening ----------------------------------------------------------------------------------
    def _read_manifest_if_any(self) -> dict | None:
        """The manifest of a run already in OUT/, None for a missing or empty OUT/; raises for foreign content."""
        if self.remote:
            return self._read_remote_manifest_if_any()
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise OutputError(f"output path exists and is not a directory: {self.path}")
        if not os.path.isdir(self.path) or not [e for e in os.listdir(self.path) if not e.startswith(".")]:
            return None
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise OutputError(
                f"output directory {self.path} is not empty and holds no fastfeat run; choose another --out"
            )
        try:
            with open(manifest_path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read {manifest_path}: {exc}") from None

    def _read_remote_manifest_if_any(self) -> dict | None:
        where = storage.display(self.path)
        try:
            if storage.is_file(self.path):
                raise OutputError(f"output path exists and is not a directory: {where}")
            entries = storage.list_dir(self.path)
            if not [e for e in entries if not e.startswith(".")]:
                return None
            if MANIFEST not in entries:
                raise OutputError(
                    f"output directory {where} is not empty and holds no fastfeat run; choose another --out"
                )
            return json.loads(storage.read_bytes(storage.join(self.path, MANIFEST)))
        except (OSError, ValueError) as exc:
            if isinstance(exc, OutputError):
                raise
            raise OutputError(f"cannot read output directory {where}: {storage.describe(exc)}") from None

    def _check(self, manifest: dict | None) -> None:
        """Same run: take its finished shards.  Different run: refuse, unless --overwrite (done in create)."""
        if manifest is None:
            return
        if manifest.get("config_hash") == self.hash:
            self.generations = manifest.get("generations", [])
            self._merge(manifest)
        elif not self.overwrite:
            raise OutputError(
                f"output directory {self.path} holds a different run ({describe_diff(manifest.get('config', {}), self.config)}); "
                "use another --out, or --overwrite to replace it"
            )

    def _merge(self, manifest: dict) -> None:
        """Take the generations and finished shards another process (or an earlier run) recorded,
        the shards only if their files are whole."""
        if len(manifest.get("generations", [])) > len(self.generations):
            self.generations = manifest["generations"]
        remote_sizes = None  # an object store: one listing gives every object's size
        for raw in manifest.get("shards", []):
            if raw["index"] in self.shards:  # held already: no stat per listed shard at every commit
                continue
            rec = ShardRecord(**raw)
            if self.remote:
                if remote_sizes is None:
                    remote_sizes = storage.list_dir(self.path)
                whole = all(remote_sizes.get(f["file"]) == f["bytes"] for f in rec.files())
            else:
                whole = all(_file_size(os.path.join(self.path, f["file"])) == f["bytes"] for f in rec.files())
            if rec.index not in self.shards and whole:
                self.shards[rec.index] = rec

    @contextlib.contextmanager
    def _locked(self):
        """Exclusive lock on OUT/.lock, then merge what is on disk: parts of one run share the manifest.

        A manifest of another configuration appearing meanwhile (another run started on the same
        OUT/) is an error: the two runs would overwrite each other's shards.

        On an object store there is no lock: the manifest has a single writer (see the module docstring),
        and re-reading it still catches another run started on the same OUT/.
        """
        if self.remote:
            try:
                on_store = json.loads(storage.read_bytes(storage.join(self.path, MANIFEST)))
            except FileNotFoundError:
                on_store = {}
            self._take_on_disk(on_store)
            yield
            return
        with open(os.path.join(self.path, LOCK), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    with open(os.path.join(self.path, MANIFEST), encoding="utf-8") as f:
                        on_disk = json.load(f)
                except (OSError, ValueError):
                    on_disk = {}
                self._take_on_disk(on_disk)
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _take_on_disk(self, on_disk: dict) -> None:
        """Merge the manifest found in OUT/; one of another configuration is an error, or cleared by --overwrite."""
        if on_disk and on_disk.get("config_hash") != self.hash:
            if not self.overwrite:
                raise OutputError(f"another run with a different configuration is using {storage.display(self.path)}")
            self._clear()  # --overwrite: exactly once, by whichever part takes the lock first
            self.overwrite = False
        elif on_disk:
            self._merge(on_disk)

    def _clear(self) -> None:
        if self.remote:
            # The other run's manifest is replaced (one PUT) by this run's empty one before its files go:
            # a manifest never lists a deleted shard, even if this process dies midway.
            self._write_manifest(complete=False)
            for entry in storage.list_dir(self.path):
                if SHARD_RE.match(entry) or ITEMS_RE.match(entry) or entry in (ERRORS, SUMMARY):
                    storage.delete(storage.join(self.path, entry))
            return
        for entry in os.listdir(self.path):
            if (
                SHARD_RE.match(entry)
                or ITEMS_RE.match(entry)
                or entry in (MANIFEST, ERRORS, SUMMARY)
                or entry.startswith(".tmp-")
            ):
                os.unlink(os.path.join(self.path, entry))

    def create(self, new_generation: tuple[dict, list] | None = None) -> None:
        """Create OUT/ (only once the run is known to be valid: bad arguments write nothing).

        Under the lock: an --overwrite clears the other run here, temporary files left by killed
        writers (their process is gone) are removed, and a new generation's item list is recorded.
        """
        try:
            if self.remote:
                storage.make_dir(self.path)
            else:
                os.makedirs(self.path, exist_ok=True)
            with self._locked():
                self.overwrite = False  # from now on a foreign manifest means a concurrent run
                if self.remote:  # shard temp files are staged on this host; a killed run's are removed here
                    os.makedirs(self.staging_dir(), exist_ok=True)
                    _remove_orphan_tmp(self.staging_dir())
                    self._remove_unlisted_objects()
                else:
                    _remove_orphan_tmp(self.path)
                if new_generation is not None:
                    generation, items = new_generation
                    same = [g for g in self.generations if g["items_file"] == generation["items_file"]]
                    if not same:
                        _write_items(storage.join(self.path, generation["items_file"]), items)
                        self.generations.append(generation)
                    elif same[0]["ids_labels_sha256"] != generation["ids_labels_sha256"]:
                        raise OutputError(f"another run added different items to {self.path} meanwhile")
                self._write_manifest(complete=False)
        except OSError as exc:
            where = storage.display(self.path) if self.remote else self.path
            raise OutputError(f"cannot write to output directory {where}: {storage.describe(exc)}") from None

    def _remove_unlisted_objects(self) -> None:
        """Object stores: delete what a killed writer left that the manifest does not list: temp keys of
        uploads (``.tmp-*``, see fastfeat.storage), shard objects uploaded but never committed, and an item
        list whose generation was never recorded.  The manifest is the truth, so none of it is data; the
        output's single writer (the CLI refuses parts on object stores, Ray's driver alone calls this)
        does it before any upload of its own."""
        listed = {f["file"] for r in self.shards.values() for f in r.files()}
        listed |= {g["items_file"] for g in self.generations}
        for entry in storage.list_dir(self.path):
            stray = SHARD_RE.match(entry) or ITEMS_RE.match(entry)
            if entry.startswith(storage.TEMP_PREFIX) or (stray and entry not in listed):
                storage.delete(storage.join(self.path, entry))

    def staging_dir(self) -> str:
        """Object stores: the local folder where this OUT/'s shard files are written before their upload
        (one per output location, so runs writing to different places never share temp names)."""
        key = hashlib.sha256(storage.display(self.path).encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), "fastfeat-staging", key)

    # -- records ----------------------------------------------------------------------------------
    def _write_manifest(self, complete: bool) -> None:
        manifest = {
            "format": FORMAT,
            "config_hash": self.hash,
            "config": self.config,
            "source": self.source,
            "generations": self.generations,
            "complete": complete,
            "rows": sum(r.rows for r in self.shards.values()),
            "shards": [vars(self.shards[k]) for k in sorted(self.shards)],
        }
        data = manifest_json(manifest).encode()
        if self.remote:
            storage.write_bytes(storage.join(self.path, MANIFEST), data)  # one PUT: atomic
        else:
            _atomic_write(os.path.join(self.path, MANIFEST), data)

    def commit_shard(self, record: ShardRecord) -> None:
        self.commit_shards([record])

    def commit_shards(self, records: list[ShardRecord]) -> None:
        """Record finished shards with one manifest write: a Ray driver commits together the shards that
        finished while it wrote the previous manifest, so commits keep up however many workers there are."""
        with self._locked():
            for record in records:
                self.shards[record.index] = record
            self._write_manifest(complete=False)

    def rows(self) -> int:
        return sum(r.rows for r in self.shards.values())

    def expected_shards(self) -> int:
        return expected_shards(self.generations, self.config.get("shard_size", 1))

    def finish(self, n_shards: int | None = None) -> bool:
        """Record completion (when every shard of every part and generation is done, or ``n_shards``)
        and write errors.parquet."""
        with self._locked():
            complete = len(self.shards) == (self.expected_shards() if n_shards is None else n_shards)
            self._write_manifest(complete=complete)
            self._write_errors()
        return complete

    def _write_errors(self) -> None:
        records = [
            (e, kept) for k in sorted(self.shards) for kept, es in ((False, self.shards[k].errors), (True, self.shards[k].warnings)) for e in es
        ]  # fmt: skip
        table = pa.table(
            {
                "id": pa.array([e["id"] for e, _ in records], pa.string()),
                "stage": pa.array([e["stage"] for e, _ in records], pa.string()),
                "message": pa.array([e["message"] for e, _ in records], pa.string()),
                # False: the image has no row (skipped); True: it has one, the record says what was wrong.
                "kept": pa.array([kept for _, kept in records], pa.bool_()),
            }
        )
        if self.remote:
            _upload_written(storage.join(self.path, ERRORS), lambda f: pq.write_table(table, f, compression="zstd"))
            return
        tmp = os.path.join(self.path, ".tmp-" + ERRORS)
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, os.path.join(self.path, ERRORS))

    def write_summary(self, summary: dict) -> None:
        data = json.dumps(summary, indent=1).encode()
        if self.remote:
            storage.write_bytes(storage.join(self.path, SUMMARY), data)
        else:
            _atomic_write(os.path.join(self.path, SUMMARY), data)


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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:28] + "…" + text[-28:]


def describe_diff(old: dict, new: dict) -> str:
    """What differs between two run configurations, in human terms: "precision: bf16 → fp32"."""
    a, b = _flatten(old), _flatten(new)
    # The metadata repeats some settings (layers, dtype); name each difference once, by its leaf key.
    diffs, seen = [], set()
    for key in sorted(set(a) | set(b), key=lambda k: (k.count("."), k)):
        if a.get(key) == b.get(key):
            continue
        leaf = key.removeprefix("metadata.")
        if leaf in seen:
            continue
        seen.add(leaf)
        was = _short(a[key]) if key in a else "(not set)"
        now = _short(b[key]) if key in b else "(not set)"
        diffs.append(f"{leaf}: {was} → {now}")
    return (
        "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "") or "different configuration"
    )


def _ids_labels(items):
    """The id and label columns, without building an Item per entry when ``items`` is an ItemList."""
    if hasattr(items, "ids"):
        return items.ids(), items.labels()
    return (it.id for it in items), (it.label for it in items)


def ids_labels_sha256(items) -> str:
    ids, labels = _ids_labels(items)
    return hashlib.sha256("\n".join(f"{i}\t{lab}" for i, lab in zip(ids, labels, strict=True)).encode()).hexdigest()


def expected_shards(generations: list[dict], shard_size: int) -> int:
    return sum(-(-g["items"] // shard_size) for g in generations)


def _write_items(path: str, items) -> None:
    table = pa.table(
        {
            "id": pa.array(list(_ids_labels(items)[0]), pa.string()),
            "label": pa.array(list(_ids_labels(items)[1]), pa.string()),
        }
    )
    if storage.is_remote(path):
        _upload_written(path, lambda f: feather.write_feather(table, f, compression="zstd"))
        return
    tmp = path + ".tmp"
    feather.write_feather(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_items(path: str, generation: dict) -> tuple[list[str], list[str | None]]:
    location = storage.join(path, generation["items_file"])
    table = feather.read_table(storage.open_input_file(location) if storage.is_remote(location) else location)
    return table.column("id").to_pylist(), table.column("label").to_pylist()


def shard_tasks(generations: list[dict], shard_size: int) -> list[tuple[int, int, int]]:
    """(index, first item, end item) of every shard, over all generations, in the global item order."""
    tasks = []
    for g in generations:
        for j in range(-(-g["items"] // shard_size)):
            first = g["first_item"] + j * shard_size
            tasks.append((g["first_shard"] + j, first, min(first + shard_size, g["first_item"] + g["items"])))
    return tasks


def plan_items(out: OutputDir, items: list, append: bool) -> tuple[list, tuple[dict, list] | None]:
    """The run's items in global order (every generation's, then the new ones) and the generation to
    add, if any.  Raises OutputError, in human terms, when ``items`` differ from what OUT/ holds and
    ``append`` is not set, or when an unfinished shard's items are no longer in the source."""

    def generation(new: list, index: int, first_item: int, first_shard: int) -> dict:
        return {"items": len(new), "ids_labels_sha256": ids_labels_sha256(new), "first_item": first_item,
                "first_shard": first_shard, "items_file": f"items-{index:05d}.arrow"}  # fmt: skip

    if not out.generations:
        return items, (generation(items, 0, 0, 0), items)
    if len(out.generations) == 1 and out.generations[0]["ids_labels_sha256"] == ids_labels_sha256(items):
        return items, None  # the common resume: the same items as the first run
    held_ids, held_labels = [], []
    for g in out.generations:
        ids, labels = read_items(out.path, g)
        held_ids += ids
        held_labels += labels
    current = {it.id: it for it in items}
    held = dict(zip(held_ids, held_labels, strict=True))
    relabelled = [it.id for it in items if it.id in held and held[it.id] != it.label]
    if relabelled:
        raise OutputError(
            f"output directory {out.path} holds a different run: {len(relabelled):,} item(s) have another label "
            f"now, e.g. {relabelled[0]!r}; use another --out, or --overwrite to replace it"
        )
    added = [it for it in items if it.id not in held]
    removed = len(held) - (len(items) - len(added))
    if (added or removed) and not append:
        raise OutputError(
            f"output directory {out.path} holds another item list (items: {len(held):,} → {len(items):,}, "
            f"{len(added):,} added, {removed:,} removed); use --append to extract the added items into new "
            "shards, another --out, or --overwrite to replace it"
        )
    for index, first, end in shard_tasks(out.generations, out.config["shard_size"]):
        gone = [i for i in held_ids[first:end] if i not in current] if index not in out.shards else []
        if gone:
            raise OutputError(
                f"cannot finish shard {index}: {len(gone):,} of its items are no longer in the source, e.g. {gone[0]!r}"
            )
    # None only for items of finished shards, which are never read again.
    ordered = [current.get(i) for i in held_ids] + added
    if not added:
        return ordered, None
    new = generation(added, len(out.generations), len(held_ids), out.expected_shards())
    return ordered, (new, added)


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
        self._writer = sink.open(self.tmp_paths)

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
            for tmp in self.tmp_paths.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)


def verify(path: str, partial: bool = False) -> list[str]:
    """Check OUT/ against its manifest: every listed shard's files present with their checksums, row
    counts, rows + errors accounting for each shard's items, ids unique; the run finished (unless
    ``partial``); no shard file the manifest does not list (a ``part-*`` glob would read it); the
    error table present and matching.  Returns the problems (empty when intact).

    On an object store the folder is listed once and each listed shard's files are downloaded to a
    local temp folder, one shard at a time, to be checksummed and read like local ones."""
    path = storage.local_path(path)
    remote = storage.is_remote(path)
    manifest_path = storage.join(path, MANIFEST)
    try:
        if remote:
            manifest = json.loads(storage.read_bytes(manifest_path))
        else:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
    except (OSError, ValueError) as exc:
        reason = storage.describe(exc) if remote else exc
        where = storage.display(manifest_path) if remote else manifest_path
        raise OutputError(f"cannot read {where}: {reason}") from None
    listing = storage.list_dir(path) if remote else None  # name -> size of every object in OUT/
    config = manifest.get("config", {})
    metadata = config.get("metadata", {})
    layer_dims = {name: math.prod(shape) for name, shape in metadata.get("layers", {}).items()}
    sink = get_sink(config.get("format", DEFAULT_FORMAT))(Layout(layer_dims, metadata.get("dtype", "float16"), {}))
    records = [ShardRecord(**raw) for raw in manifest.get("shards", [])]
    problems: list[str] = []
    seen: set[str] = set()
    for rec in records:
        with _shard_paths(path, rec, listing) as paths:
            problems += _check_shard(rec, paths, sink, seen)
    problems += _completeness(manifest, records, partial)
    listed = {f["file"] for rec in records for f in rec.files()}
    for entry in sorted(listing if remote else os.listdir(path)):
        if SHARD_RE.match(entry) and not entry.endswith(".tmp") and entry not in listed:
            problems.append(f"{entry}: not listed in the manifest (a part-* glob would read its rows too)")
    if manifest.get("complete"):  # written when a run (or part) ends: an interrupted run's may be stale
        problems += _check_errors_table(path, records, listing)
    return problems


@contextlib.contextmanager
def _shard_paths(path: str, rec: ShardRecord, listing: dict[str, int | None] | None):
    """{file: local path} of a shard's files: in OUT/ itself, or (an object store, ``listing`` given)
    downloaded into a temp folder that is removed afterwards.  A file that is not there gets a path
    that does not exist."""
    if listing is None:
        yield {f["file"]: os.path.join(path, f["file"]) for f in rec.files()}
        return
    with tempfile.TemporaryDirectory(prefix="fastfeat-verify-") as folder:
        paths = {f["file"]: os.path.join(folder, f["file"]) for f in rec.files()}
        for name, local in paths.items():
            if listing.get(name) is not None:
                storage.download(storage.join(path, name), local)
        yield paths


def _check_shard(rec: ShardRecord, paths: dict[str, str], sink: Sink, seen: set[str]) -> list[str]:
    """The problems of one listed shard; adds its ids to ``seen``."""
    missing = [name for name, p in paths.items() if not os.path.isfile(p)]
    if missing:
        return [f"{name}: missing" for name in missing]
    problems = [f"{f['file']}: checksum mismatch" for f in rec.files() if file_sha256(paths[f["file"]]) != f["sha256"]]
    try:
        rows, ids = sink.inspect(paths)
    except Exception as exc:  # a damaged file raises various pyarrow/numpy errors
        return [*problems, f"{rec.file}: unreadable ({exc})"]
    if rows != rec.rows:
        problems.append(f"{rec.file}: {rows} rows, manifest says {rec.rows}")
    if rec.rows + len(rec.errors) != rec.end_item - rec.first_item:
        problems.append(
            f"{rec.file}: {rec.rows} rows + {len(rec.errors)} errors do not account for "
            f"items [{rec.first_item}, {rec.end_item})"
        )
    dup = seen.intersection(ids)
    if dup or len(set(ids)) != len(ids):
        problems.append(f"{rec.file}: duplicate ids, e.g. {sorted(dup)[:1] or ids[:1]}")
    seen.update(ids)
    return problems


def _completeness(manifest: dict, records: list[ShardRecord], partial: bool) -> list[str]:
    shard_size = max(manifest.get("config", {}).get("shard_size", 1), 1)
    expected = [k for k, _, _ in shard_tasks(manifest.get("generations", []), shard_size)]
    done = {r.index for r in records}
    missing = [k for k in expected if k not in done]
    if manifest.get("complete") and (missing or sorted(done) != expected):
        return [f"manifest says complete but lists shards {_ranges(sorted(done))}, expected 0..{len(expected) - 1}"]
    if missing and not partial:
        return [
            f"incomplete: {len(done)} of {len(expected)} shards finished, missing {_ranges(missing)}; rerun the same "
            "extract command to finish it (or pass --partial to check only the finished shards)"
        ]
    return []


def _check_errors_table(path: str, records: list[ShardRecord], listing: dict | None = None) -> list[str]:
    file = storage.join(path, ERRORS)
    if not (listing.get(ERRORS) is not None if listing is not None else os.path.isfile(file)):
        return [f"{ERRORS}: missing"]
    try:
        table = pq.read_table(storage.open_input_file(file) if listing is not None else file)
    except Exception as exc:  # a damaged file raises various pyarrow errors
        return [f"{ERRORS}: unreadable ({exc})"]
    skipped = sorted(e["id"] for r in records for e in r.errors)
    kept = table.column("kept").to_pylist() if "kept" in table.column_names else [False] * len(table)
    in_table = sorted(i for i, k in zip(table.column("id").to_pylist(), kept, strict=True) if not k)
    if in_table != skipped:
        return [f"{ERRORS}: {len(in_table)} skipped items, the manifest lists {len(skipped)}"]
    return []


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            parts.append(f"{start}" if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts) or "none"
