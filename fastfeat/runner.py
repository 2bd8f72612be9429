"""The runner: read -> decode -> forward -> write over a list of output shards.

It knows no model and no file format.  It is handed four callables and drives them concurrently,
linked by bounded queues, so that the decode of batch i+1 overlaps the forward pass of batch i and
the write of batch i-1, and memory stays bounded whatever the dataset size:

    read (thread)  : read(item) -> (bytes, (width, height), Problem | None) -> q_read
    decode (thread): decode(bytes list, sizes) -> (NHWC images, {bad j: message}, {warned j: message})
    forward (main) : forward(images, good positions, busy) -> {layer: [rows, dim] array}
    write (thread) : open_shard(shard) -> add(Rows) / add_errors / add_warnings / close / abort

A warned image (recoverable corruption) keeps its row and gets a record; with ``strict`` it is
skipped like a bad one.

A read that fails for a reason that is not the image's (``read`` raises fastfeat.faults.ReadFault, after
its own retries) is never recorded: the read stage finishes that batch (the reader then tries each image
once) and reads no further, the shards before it are written and committed, and the write stage aborts
the shard that holds it and raises :class:`~fastfeat.errors.ReadStopped`, naming the cause and the number
of images affected.  A rerun picks them up.

Batches never span shards and a shard always holds the same items, so the batch composition,
and hence every feature value, is the same on every run, resumed or not.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ReadStopped
from .faults import CORRUPT, Problem, ReadFault
from .sinks.base import Rows
from .sources.items import Item

QUEUE_DEPTH = 3  # batches in flight between two stages: enough to hide jitter, bounded memory
STAGES = ("read", "decode", "h2d", "forward", "d2h", "write")  # busy time is accounted per stage
THREADS = ("read", "decode", "forward", "write")  # each waits on its queues: idle time per thread
_END = object()


@dataclass(frozen=True)
class ShardTask:
    """Output shard ``index`` holds the rows of items [first, end)."""

    index: int
    first: int
    end: int


@dataclass
class Batch:
    shard: ShardTask
    last_in_shard: bool
    items: list[Item]
    encoded: list[np.ndarray | None] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    errors: dict[int, Problem] = field(default_factory=dict)  # position -> (stage, message, cause)
    warnings: dict[int, Problem] = field(default_factory=dict)  # kept despite: position -> (stage, message, cause)
    faults: dict[int, ReadFault] = field(default_factory=dict)  # not the images' fault: the shard is not committed
    images: torch.Tensor | None = None
    features: dict[str, np.ndarray] | None = None
    good: list[int] = field(default_factory=list)


class Flow:
    """Stop flag, first error, and per-stage busy / per-thread wait time shared by the stage threads."""

    def __init__(self):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.busy = dict.fromkeys(STAGES, 0.0)
        self.wait = dict.fromkeys(THREADS, 0.0)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.stop.set()

    def put(self, q: queue.Queue, item, thread: str) -> bool:
        t0 = time.perf_counter()
        try:
            while not self.stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False
        finally:
            self.wait[thread] += time.perf_counter() - t0

    def get(self, q: queue.Queue, thread: str):
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    return q.get(timeout=0.1)
                except queue.Empty:
                    if self.stop.is_set():
                        return _END
        finally:
            self.wait[thread] += time.perf_counter() - t0

    def thread(self, name: str, target, *args) -> threading.Thread:
        def run():
            try:
                target(*args)
            except BaseException as exc:  # propagate to the main thread
                self.fail(exc)

        t = threading.Thread(target=run, name=f"fastfeat-{name}", daemon=True)
        t.start()
        return t


def _records(items: list[Item], problems: dict[int, Problem]) -> list[dict]:
    return [{"id": items[p].id, "stage": s, "message": m, "cause": c} for p, (s, m, c) in sorted(problems.items())]


def _stop_message(batch: Batch) -> str:
    """One line: why the run stopped, how many images, which shard is not committed."""
    first = min(batch.faults)
    n = len(batch.faults)
    return (
        f"stopped: {n} image{'s' if n > 1 else ''} of output shard {batch.shard.index} could not be read for a "
        f"reason that is not the image's ({batch.faults[first]}; first: {batch.items[first].id!r}); the shard is not "
        "committed and no image was recorded as failed; finished shards are kept: run the same command again to resume"
    )


@dataclass
class RunStats:
    rows: int = 0
    errors: int = 0
    warnings: int = 0
    wall_s: float = 0.0
    busy: dict[str, float] = field(default_factory=dict)
    wait: dict[str, float] = field(default_factory=dict)
    first_batch_at: float | None = None  # time.time() when the first batch reached its shard writer


ReadFn = Callable[[Item], tuple[np.ndarray | None, tuple[int, int], Problem | None]]  # may raise ReadFault
DecodeFn = Callable[
    [list[np.ndarray], list[tuple[int, int]]], tuple[torch.Tensor | None, dict[int, str], dict[int, str]]
]
ForwardFn = Callable[[torch.Tensor, list[int], dict[str, float]], dict[str, np.ndarray]]


class Runner:
    """Runs the four stages over ``items`` for the given shards; ``progress(images, errors)`` after each written batch."""

    def __init__(
        self,
        items: list[Item],
        batch_size: int,
        read: ReadFn,
        decode: DecodeFn,
        forward: ForwardFn,
        open_shard: Callable[[ShardTask], object],
        progress: Callable[[int, int], None] | None = None,
        strict: bool = False,
    ):
        self.items, self.batch_size, self.strict = items, batch_size, strict
        self.read, self.decode, self.forward, self.open_shard = read, decode, forward, open_shard
        self.progress = progress

    def _batches(self, shards: list[ShardTask]) -> Iterator[Batch]:
        for shard in shards:
            for start in range(shard.first, shard.end, self.batch_size):
                end = min(start + self.batch_size, shard.end)
                yield Batch(shard, end == shard.end, self.items[start:end])

    def _read_stage(self, flow: Flow, shards: list[ShardTask], q_out: queue.Queue) -> None:
        for batch in self._batches(shards):
            t0 = time.perf_counter()
            for pos, item in enumerate(batch.items):
                try:
                    data, size, err = self.read(item)
                except ReadFault as exc:  # not the image's: never a record (see the module docstring)
                    data, size, err = None, (0, 0), None
                    batch.faults[pos] = exc
                batch.encoded.append(data)
                batch.sizes.append(size)
                if err:
                    batch.errors[pos] = err
            flow.busy["read"] += time.perf_counter() - t0
            if not flow.put(q_out, batch, "read"):
                return
            if batch.faults:  # the write stage stops the run at this batch: read no further
                break
        flow.put(q_out, _END, "read")

    def _decode_stage(self, flow: Flow, q_in: queue.Queue, q_out: queue.Queue) -> None:
        while (batch := flow.get(q_in, "decode")) is not _END:
            if batch.faults:  # never written: nothing to decode
                batch.encoded = []
                if not flow.put(q_out, batch, "decode"):
                    return
                continue
            t0 = time.perf_counter()
            readable = [i for i in range(len(batch.items)) if i not in batch.errors]
            # Unreadable files keep their slot as a zero image: the batch shape stays that of a clean run.
            images, bad, warned = self.decode([batch.encoded[i] for i in readable], [batch.sizes[i] for i in readable])
            for j, msg in bad.items():
                batch.errors[readable[j]] = Problem("decode", msg, CORRUPT)
            for j, msg in warned.items():
                (batch.errors if self.strict else batch.warnings)[readable[j]] = Problem("decode", msg, CORRUPT)
            batch.good = [i for i in range(len(batch.items)) if i not in batch.errors]
            if images is not None:
                views = len(images) // len(readable)  # rows per image: >1 under test-time augmentation
                full = images.new_zeros((len(batch.items) * views, *images.shape[1:]))
                full.unflatten(0, (-1, views))[readable] = images.unflatten(0, (-1, views))
                batch.images = full
            batch.encoded = []
            flow.busy["decode"] += time.perf_counter() - t0
            if not flow.put(q_out, batch, "decode"):
                return
        flow.put(q_out, _END, "decode")

    def _write_stage(self, flow: Flow, q_in: queue.Queue, stats: RunStats) -> None:
        shard = None
        try:
            while (batch := flow.get(q_in, "write")) is not _END:
                if batch.faults:  # the finally below aborts the shard: it is never committed
                    raise ReadStopped(_stop_message(batch), len(batch.faults))
                t0 = time.perf_counter()
                if shard is None:
                    shard = self.open_shard(batch.shard)
                shard.add_errors(_records(batch.items, batch.errors))
                shard.add_warnings(_records(batch.items, batch.warnings))
                if batch.features is not None:
                    rows = [batch.items[i] for i in batch.good]
                    sizes = [batch.sizes[i] for i in batch.good]
                    shard.add(Rows([it.id for it in rows], [it.label for it in rows], sizes, batch.features))
                if stats.first_batch_at is None:
                    stats.first_batch_at = time.time()
                stats.rows += len(batch.good)
                stats.errors += len(batch.errors)
                stats.warnings += len(batch.warnings)
                if batch.last_in_shard:
                    shard.close()
                    shard = None
                flow.busy["write"] += time.perf_counter() - t0
                if self.progress is not None:
                    self.progress(len(batch.items), len(batch.errors))
        finally:
            if shard is not None:  # interrupted mid-shard: the partial shard is redone on resume
                shard.abort()

    def run(self, shards: list[ShardTask]) -> RunStats:
        """Process ``shards``; the first error of any stage (or Ctrl-C) stops all of them and is raised."""
        flow, stats = Flow(), RunStats()
        q_read: queue.Queue = queue.Queue(QUEUE_DEPTH)
        q_decoded: queue.Queue = queue.Queue(QUEUE_DEPTH)
        q_features: queue.Queue = queue.Queue(QUEUE_DEPTH)
        t_start = time.perf_counter()
        threads: list[threading.Thread] = []
        try:
            threads += [
                flow.thread("read", self._read_stage, flow, shards, q_read),
                flow.thread("decode", self._decode_stage, flow, q_read, q_decoded),
                flow.thread("write", self._write_stage, flow, q_features, stats),
            ]
            while (batch := flow.get(q_decoded, "forward")) is not _END:
                if batch.images is not None and batch.good:
                    batch.features = self.forward(batch.images, batch.good, flow.busy)
                batch.images = None
                if not flow.put(q_features, batch, "forward"):
                    break
            flow.put(q_features, _END, "forward")
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.1)
        except BaseException as exc:  # KeyboardInterrupt included: stop the stages, keep finished shards
            flow.fail(exc)
        finally:
            for t in threads:
                t.join()
        if flow.error is not None:
            raise flow.error
        stats.wall_s = time.perf_counter() - t_start
        stats.busy, stats.wait = flow.busy, flow.wait
        return stats
