"""The output directory and its exactly-once protocol, whatever the format (fastfeat.sinks).

Layout of an output directory (``--format parquet``; see the sinks for the others)::

    OUT/part-00000.parquet   rows of items [0, S), S = --shard-size
    OUT/part-00001.parquet   rows of items [S, 2S) ...
    OUT/manifest.json        the run's configuration and every finished shard
    OUT/errors.parquet       id, stage, message, kept, cause of every image skipped (or kept with a warning)
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

from .generations import expected_shards, ids_labels_sha256, plan_items, read_items, shard_tasks
from .layout import (
    ERRORS,
    FORMAT,
    ITEMS_RE,
    LOCK,
    MANIFEST,
    SHARD_RE,
    SUMMARY,
    TMP_RE,
    OutputError,
    host_tag,
    remove_tmp_of,
    tmp_name,
)
from .manifest import OutputDir, ShardRecord, config_hash, describe_diff, manifest_json
from .schema import ManifestError, validate_manifest
from .transaction import ShardTransaction
from .verification import verify

__all__ = [
    "ERRORS",
    "FORMAT",
    "ITEMS_RE",
    "LOCK",
    "MANIFEST",
    "ManifestError",
    "SHARD_RE",
    "SUMMARY",
    "TMP_RE",
    "OutputDir",
    "OutputError",
    "ShardRecord",
    "ShardTransaction",
    "config_hash",
    "describe_diff",
    "expected_shards",
    "host_tag",
    "ids_labels_sha256",
    "manifest_json",
    "plan_items",
    "read_items",
    "remove_tmp_of",
    "shard_tasks",
    "tmp_name",
    "validate_manifest",
    "verify",
]
