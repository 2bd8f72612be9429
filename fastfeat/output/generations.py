"""Generations and the plan: which items each shard covers, over the first run and every ``--append``."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.feather as feather

from .. import storage
from .layout import OutputError, _upload_written

if TYPE_CHECKING:
    from .manifest import OutputDir


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
