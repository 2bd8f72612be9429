"""The manifest: the run's configuration and finished shards, read, merged under the lock and written
(:class:`OutputDir`), and what differs between two configurations (:func:`describe_diff`)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from .generations import _write_items, expected_shards
from .layout import (
    ERRORS,
    FORMAT,
    ITEMS_RE,
    LOCK,
    MANIFEST,
    SHARD_RE,
    SUMMARY,
    OutputError,
    _atomic_write,
    _file_size,
    _remove_orphan_tmp,
    _upload_written,
)
from .schema import ManifestError, validate_manifest


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


@dataclass
class ShardRecord:
    index: int
    file: str
    rows: int
    first_item: int
    end_item: int
    sha256: str
    bytes: int = 0  # file size: a truncated file is not taken as finished on resume
    errors: list[dict] = field(default_factory=list)  # skipped items: id, stage, message, cause (since 22.1)
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
                manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot read {manifest_path}: {exc}") from None
        return self._checked(manifest, manifest_path)

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
            manifest = json.loads(storage.read_bytes(storage.join(self.path, MANIFEST)))
        except (OSError, ValueError) as exc:
            if isinstance(exc, OutputError):
                raise
            raise OutputError(f"cannot read output directory {where}: {storage.describe(exc)}") from None
        return self._checked(manifest, storage.display(storage.join(self.path, MANIFEST)))

    def _checked(self, manifest: object, where: str) -> dict:
        """``manifest`` once validated (fastfeat.output.schema; the shards this process holds are not taken
        from it again, so not checked again).  One that fails the check is refused in one line; under
        --overwrite it is a foreign run's, replaced like any other (its files go by name)."""
        try:
            return validate_manifest(manifest, where, held=self.shards)
        except ManifestError as exc:
            if self.overwrite:
                return {"config_hash": None}  # matches no configuration: cleared by --overwrite
            raise ManifestError(f"{exc}; use another --out, or --overwrite to replace it") from None

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
            if on_store:
                on_store = self._checked(on_store, storage.display(storage.join(self.path, MANIFEST)))
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
                if on_disk:  # another part's (or an earlier run's) records are trusted only once checked
                    on_disk = self._checked(on_disk, os.path.join(self.path, MANIFEST))
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
                # The image's own reason (fastfeat.faults.CAUSES): missing, not_image, corrupt, too_large, unsafe;
                # null for a record of an older fastfeat.  Nothing else is ever recorded (a storage fault stops
                # the run).  The last column: readers of the older table by position still read it.
                "cause": pa.array([e.get("cause") for e, _ in records], pa.string()),
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
