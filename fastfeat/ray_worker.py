"""The remote side of ``fastfeat extract --ray``: a Ray actor (:class:`ShardWorker`) that builds the run's
stages once (``fastfeat.stages.build_stages``, as a single-process run does) and writes whole output
shards; the driver (``fastfeat.cluster``) commits them.

Nothing here imports Ray or torch at module level: the driver imports this module to name the actor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from .runner import ShardTask
    from .stages import StageOptions


SHARED_OUT = "--out must be storage every node shares"


class RayRunError(RuntimeError):
    """The run could not go on on Ray (workers died, a worker refused to start, a worker does not see the
    driver's output): one line, exit code 1; the finished shards are kept and the same command resumes."""


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to build the same stages and sink as the driver's run (weights travel separately)."""

    out: str  # absolute for a local path: a worker's current folder is not the driver's
    run_config: dict  # the manifest's config: the worker's OutputDir must find the same run in OUT/
    generations: tuple[str, ...]  # ids_labels_sha256 of each generation in the driver's manifest (the same OUT/)
    stage: StageOptions  # the driver's, mean image included (no path has to exist on the worker's host)
    format: str
    image_column: str
    strict: bool
    read_retries: int  # --read-retries (fastfeat.faults): not in the run config, it changes no row


class LocalShardWorker:
    """One model, one decoder, one output directory; ``run_shard`` writes a whole shard.  Plain Python:
    :class:`ShardWorker` is it as a Ray actor (and tests/test_stages.py runs it without Ray).

    ``threads``: the decoder's and torch's threads when --threads was not given (a worker: the CPUs Ray
    granted it).  ``on_batch``: a picklable ``callable(shard_index)`` called after every batch written
    (tests hold a worker mid-shard with it: :class:`fastfeat.testing.HoldShard`); None in a normal run."""

    def __init__(
        self, config: WorkerConfig, tensors: dict, threads: int = 1, on_batch: Callable[[int], None] | None = None
    ):
        import socket

        import torch

        from .output import describe_diff
        from .sinks import get_sink
        from .sinks.base import Layout
        from .sources import ItemReader
        from .stages import build_stages

        self.config, self.on_batch = config, on_batch
        self.out = check_shared_output(config, socket.gethostname())  # first: before anything is loaded
        self.threads = config.stage.num_threads or threads
        torch.set_num_threads(self.threads)  # two workers on one node must not oversubscribe it
        # "cuda": Ray's CUDA_VISIBLE_DEVICES leaves the granted GPU only, whichever the driver named.
        options = replace(config.stage, device=torch.device(config.stage.device.type), num_threads=self.threads)
        metadata = options.metadata()
        if metadata != config.run_config["metadata"]:
            # Another GPU model, CPU or library version than the driver's: its shards would be labelled
            # as made the driver's way.  Run the driver on a node like the workers (or make them alike).
            raise RuntimeError(
                f"worker on {socket.gethostname()} differs from the driver "
                f"({describe_diff(config.run_config['metadata'], metadata)}); run the driver on a node like the workers"
            )
        self.stages = build_stages(options, tensors, ItemReader(config.image_column, retries=config.read_retries))
        self.sink = get_sink(config.format)(Layout(options.dims(), options.dtype, metadata))
        self.done = 0  # images of the current shard written so far (progress)

    def progress(self) -> int:
        return self.done

    def run_shard(self, shard: ShardTask, columns: tuple) -> tuple:
        """Write output shard ``shard`` from its items (items [shard.first, shard.end) of the run, as
        :func:`pack_items` columns): (its ShardRecord, the runner's RunStats).  The record is not
        committed here: the driver does."""
        from .output import ShardTransaction
        from .runner import Runner, ShardTask

        items = unpack_items(columns)
        records = []
        self.done = 0

        def open_shard(_local: ShardTask):
            return ShardTransaction(
                self.out, self.sink, shard.index, shard.first, shard.end, commit=records.append
            )  # fmt: skip

        def progress(images: int, errors: int) -> None:
            self.done += images
            if self.on_batch is not None:
                self.on_batch(shard.index)

        # The runner sees only this shard's items, at positions [0, n): batches start at the same
        # offsets from the shard's first item as in a single-process run, so every batch is the same.
        stages = self.stages
        runner = Runner(
            items, self.config.stage.batch_size, read=stages.read, decode=stages.decoder.decode,
            forward=stages.forward, open_shard=open_shard, progress=progress, strict=self.config.strict,
        )  # fmt: skip
        stats = runner.run([ShardTask(shard.index, 0, len(items))])
        return records[0], stats


class ShardWorker(LocalShardWorker):
    """The Ray actor: a :class:`LocalShardWorker` sized to the CPUs Ray granted it, which tells the driver
    where it runs.  Made an actor with ``ray.remote(ShardWorker)`` by :func:`fastfeat.cluster.run_on_ray`
    (``max_concurrency=2``, so that ``progress`` answers while ``run_shard`` runs)."""

    def __init__(self, config: WorkerConfig, tensors: dict, on_batch: Callable[[int], None] | None = None):
        import ray

        from .output import host_tag

        self.pid, self.host = os.getpid(), host_tag()
        self.node_id = ray.get_runtime_context().get_node_id()
        granted = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        super().__init__(config, tensors, threads=max(1, math.floor(granted)), on_batch=on_batch)

    def ready(self) -> tuple[str, int, str, int]:
        """(host tag, pid, node id, threads): the driver's sign that the actor is up, and whose temp files are whose."""
        return self.host, self.pid, self.node_id, self.threads


def pack_items(items: list) -> tuple:
    """A shard's items as columns: a task ships them several times faster than Item objects (see
    benchmarks/ray_overhead.py --driver-costs: 10,000 items)."""
    return tuple(list(col) for col in zip(*((it.id, it.path, it.label, it.offset, it.size, it.error) for it in items), strict=True))  # fmt: skip


def unpack_items(columns: tuple) -> list:
    from .sources import Item

    return [Item(*fields) for fields in zip(*columns, strict=True)] if columns else []


def check_shared_output(config: WorkerConfig, host: str):
    """The worker's OutputDir, once it is known to be the driver's: the same run (configuration) with the
    same item lists in its manifest.  Otherwise RayRunError, one line: the worker sees another folder."""
    from . import storage
    from .output import OutputDir, OutputError

    where = storage.display(config.out)
    try:
        out = OutputDir(config.out, config.run_config)  # reads the manifest; writes nothing
    except (OutputError, OSError) as exc:
        raise RayRunError(f"{SHARED_OUT}: the Ray worker on {host} finds another run in {where} ({exc})") from None
    seen = tuple(g["ids_labels_sha256"] for g in out.generations)
    if seen != config.generations:
        what = "no fastfeat run" if not seen else "the same run with other items"
        raise RayRunError(
            f"{SHARED_OUT}: the Ray worker on {host} finds {what} in {where}, where the driver created this run's "
            "manifest (a folder local to each node?)"
        )
    return out
