"""manifest.json checked when it is read: its keys and their types, its format version, and the file
names it lists (they are joined to OUT/, so each must name a file of OUT/ itself).

The manifest is what resume, ``verify``, ``fastfeat.data`` and ``serve --index`` trust; a damaged,
hand-edited or foreign one must be refused in one line (:class:`ManifestError`), not fail later with
a ``KeyError`` traceback or make a reader open ``../somewhere``.  A small explicit validator rather
than pydantic: pydantic comes only with the serve extra, and core fastfeat must not need it.

What is checked is what readers use.  ``config`` is the run's configuration, open-ended and compared
whole by its hash, so only the types of the keys readers take from it are checked, where present
(``format``, ``shard_size``, ``metadata.layers``, ``metadata.dtype``); every other level is closed: a
missing or unknown key is an error.
"""

from __future__ import annotations

import re
from collections.abc import Container

from .layout import FORMAT, ITEMS_RE, OutputError

# A shard file of OUT/: part-<index>.<suffix>[.<suffix>...], suffixes of letters, digits, _ and - (a
# layer name, "ids", "parquet", "npy"), so never a separator, never "..", never an absolute path.
SHARD_FILE_RE = re.compile(r"^part-(\d{5,})(?:\.[A-Za-z0-9_-]+)+$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

_TOP_KEYS = {"format", "config_hash", "config", "source", "generations", "complete", "rows", "shards"}
_GENERATION_KEYS = {"items", "ids_labels_sha256", "first_item", "first_shard", "items_file"}
# ShardRecord's fields; those with a default there may be absent (a manifest of an older 0.1 build).
_SHARD_REQUIRED = {"index", "file", "rows", "first_item", "end_item", "sha256"}
_SHARD_OPTIONAL = {"bytes", "errors", "warnings", "extra_files"}
_FILE_KEYS = {"file", "sha256", "bytes"}
_RECORD_REQUIRED = {"id", "stage", "message"}  # an error or warning record; more keys may say more
OUTPUT_DTYPES = ("float16", "float32")


class ManifestError(OutputError):
    """manifest.json is not one this fastfeat wrote and can read: one line, exit code 2."""


def validate_manifest(manifest: object, where: str = "manifest.json", held: Container[int] = ()) -> dict:
    """``manifest`` (parsed JSON) if it is a whole manifest of format fastfeat/1; ManifestError naming the
    first problem otherwise.  ``where`` (the file's path) starts the message.

    ``held``: indices of shards the caller holds already (checked when it took them) and will not take
    from this manifest: their records are not checked again (a writer re-reads the manifest at every
    commit; checking 1,000 shards' records each time would cost more than parsing them)."""

    def fail(problem: str):
        raise ManifestError(f"{where}: {problem}; not a manifest this fastfeat can read (damaged or edited by hand?)")

    if not isinstance(manifest, dict):
        fail(f"holds {_kind(manifest)}, not an object")
    version = manifest.get("format")
    if "format" in manifest and version != FORMAT:  # refused before anything else: its keys may differ
        raise ManifestError(
            f"{where}: format {version!r} is not one this fastfeat reads ({FORMAT}): written by another version "
            "of fastfeat; use that version, or extract again into a new --out"
        )
    _keys(manifest, _TOP_KEYS, set(), "the manifest", fail)
    _typed(manifest, "config_hash", str, "the manifest", fail)
    _typed(manifest, "source", (str, type(None)), "the manifest", fail)
    _typed(manifest, "complete", bool, "the manifest", fail)
    _count(manifest, "rows", "the manifest", fail)
    _config(_typed(manifest, "config", dict, "the manifest", fail), fail)
    for i, generation in enumerate(_typed(manifest, "generations", list, "the manifest", fail)):
        what = f"generation {i}"
        _keys(generation, _GENERATION_KEYS, set(), what, fail)
        for key in ("items", "first_item", "first_shard"):
            _count(generation, key, what, fail)
        _sha256(generation, "ids_labels_sha256", what, fail)
        if not ITEMS_RE.match(_typed(generation, "items_file", str, what, fail)):
            fail(f"{what} names items file {generation['items_file']!r}, not items-NNNNN.arrow in the output folder")
    seen: set[int] = set()
    for i, shard in enumerate(_typed(manifest, "shards", list, "the manifest", fail)):
        what = f"shard record {i}"
        _keys(shard, _SHARD_REQUIRED, _SHARD_OPTIONAL, what, fail)
        index = _count(shard, "index", what, fail)
        if index in seen:
            fail(f"shard {index} is listed twice")
        seen.add(index)
        if index in held:
            continue
        what = f"shard {index}"
        for key in ("rows", "first_item", "end_item"):
            _count(shard, key, what, fail)
        if shard["end_item"] < shard["first_item"]:
            fail(f"{what} ends (item {shard['end_item']}) before it starts (item {shard['first_item']})")
        _shard_file(shard, index, what, fail)
        if "bytes" in shard:
            _count(shard, "bytes", what, fail)
        for j, extra in enumerate(_typed(shard, "extra_files", list, what, fail) if "extra_files" in shard else []):
            _keys(extra, _FILE_KEYS, set(), f"file {j + 1} of {what}", fail)
            _shard_file(extra, index, f"file {j + 1} of {what}", fail)
            _count(extra, "bytes", f"file {j + 1} of {what}", fail)
        for key in ("errors", "warnings"):
            for j, record in enumerate(_typed(shard, key, list, what, fail) if key in shard else []):
                _record(record, f"{key[:-1]} record {j} of {what}", fail)
    return manifest


def _config(config: dict, fail) -> None:
    """The keys readers take from the run's config, where present (readers have defaults for absent ones;
    the config's completeness is the writer's business, checked by its hash)."""
    what = "the run's config"
    if "format" in config:
        _typed(config, "format", str, what, fail)
    if "shard_size" in config and _count(config, "shard_size", what, fail) < 1:
        fail(f"{what} has shard_size {config['shard_size']}, expected at least 1")
    metadata = _typed(config, "metadata", dict, what, fail) if "metadata" in config else {}
    layers = _typed(metadata, "layers", dict, "the run's metadata", fail) if "layers" in metadata else {}
    for name, shape in layers.items():
        if not (isinstance(shape, list) and shape and all(_is_count(n) and n > 0 for n in shape)):
            fail(f"layer {name!r} of the run's metadata has shape {shape!r}, expected a list of positive integers")
    if "dtype" in metadata and _typed(metadata, "dtype", str, "the run's metadata", fail) not in OUTPUT_DTYPES:
        fail(f"the run's metadata has dtype {metadata['dtype']!r}, expected one of {', '.join(OUTPUT_DTYPES)}")


def _shard_file(entry: dict, index: int, what: str, fail) -> None:
    """A file name of shard ``index``: part-<index>.<suffix>, inside OUT/ (no separator, no .., not absolute)."""
    name = _typed(entry, "file", str, what, fail)
    match = SHARD_FILE_RE.match(name)
    if not match:
        fail(f"{what} names file {name!r}, not a part-NNNNN.<suffix> file in the output folder")
    if int(match.group(1)) != index:
        fail(f"{what} names file {name!r}, which is another shard's")
    _sha256(entry, "sha256", what, fail)


def _record(record: object, what: str, fail) -> None:
    if type(record) is dict and len(record) == 3 and all(type(record.get(k)) is str for k in _RECORD_REQUIRED):
        return  # the usual record, checked fast: there are as many as images that failed
    if not isinstance(record, dict):
        fail(f"{what} is {_kind(record)}, not an object")
    for key in sorted(_RECORD_REQUIRED):
        _typed(record, key, str, what, fail)
    for key, value in record.items():  # extra keys (a record's kind, say) hold plain values only
        if not isinstance(value, (str, int, float, bool, type(None))):
            fail(f"{what} has {_kind(value)} under {key!r}, expected a plain value")


def _keys(entry: object, required: set[str], optional: set[str], what: str, fail) -> None:
    if not isinstance(entry, dict):
        fail(f"{what} is {_kind(entry)}, not an object")
    if missing := sorted(required - entry.keys()):
        fail(f"{what} has no {missing[0]!r}")
    if unknown := sorted(entry.keys() - required - optional):
        fail(f"{what} has an unknown key {unknown[0]!r}")


def _typed(entry: dict, key: str, kind, what: str, fail):
    if key not in entry:
        fail(f"{what} has no {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        expected = {str: "a string", dict: "an object", list: "a list", bool: "true or false"}.get(
            kind, "a string or null"
        )
        fail(f"{key!r} of {what} is {_kind(value)}, expected {expected}")
    return value


def _count(entry: dict, key: str, what: str, fail) -> int:
    if key not in entry:
        fail(f"{what} has no {key!r}")
    if not _is_count(entry[key]):
        fail(f"{key!r} of {what} is {_kind(entry[key])}, expected a non-negative integer")
    return entry[key]


def _sha256(entry: dict, key: str, what: str, fail) -> None:
    if not SHA256_RE.match(_typed(entry, key, str, what, fail)):
        fail(f"{key!r} of {what} is not a sha256 (64 lowercase hex digits): {entry[key][:80]!r}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _kind(value: object) -> str:
    """The JSON kind of ``value``, as a message says it: "a string ('abc')", "null", "a list"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
