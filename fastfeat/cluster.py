"""``fastfeat extract SRC --out DIR --ray [ADDRESS]``: one run over a Ray cluster, exactly once.

The driver (this module, in the calling process) validates, lists and plans exactly as a single-process
run (:class:`fastfeat.extractor.Extractor`), creates the output, then hands the unfinished output shards
to Ray actors (:class:`fastfeat.ray_worker.ShardWorker`), one whole shard per task with only that shard's
items.  Each actor loads the model once, from weights the driver put in Ray's object store (no path has to exist on
the worker's host), and runs the same :class:`fastfeat.runner.Runner` over the shard, writing it with
the same temp-then-rename :class:`fastfeat.output.ShardTransaction`; but its ``commit`` only hands the
:class:`ShardRecord` back.  The driver alone merges records into ``manifest.json``, so no lock has to
hold across hosts, and the output is a single-process run's: same shards, same bytes, one manifest.

Faults: an actor (or its node) that dies mid-shard fails that task with ``RayActorError``; the driver
puts the shard back in the queue for the next free actor and starts a new actor in the dead one's place
(wherever Ray finds room), which takes work once it answers.  The dead writer's temp files carry its
pid and host, so they can never be renamed into place; the driver deletes them at the end (it knows
its workers, alive or not).  A shard done twice (a worker that died after its rename) is committed
once, and its two writes were byte-identical.  A driver that dies leaves the manifest listing the
shards it committed; the same command resumes from there, like any interrupted run.

Shared output: ``--out`` must be storage every node shares (a network file system, an object store).  An
actor checks, before it loads anything, that it sees the driver's manifest there with the same
configuration and item lists (:func:`fastfeat.ray_worker.check_shared_output`); the driver checks that the
files of every shard a worker returns are in OUT/ as it sees them, before it commits the shard.  Either
failing stops the run in one line: a node-local path that happens to exist on every node would otherwise
collect shards on the workers' disks while the driver records files it cannot see.

Ray is imported lazily, only with ``--ray``: a plain install runs everything else without it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from contextlib import redirect_stderr
from functools import partial
from typing import TYPE_CHECKING

from .errors import ConfigError
from .ray_worker import (
    SHARED_OUT,
    RayRunError,
    ShardWorker,
    WorkerConfig,
    check_shared_output,
    pack_items,
    unpack_items,
)

__all__ = [  # the worker's names too: importable from here as before the split
    "RayRunError", "ShardWorker", "WorkerConfig", "check_ray_options", "import_ray", "pack_items", "plan_workers",
    "run_on_ray", "unpack_items", "worker_config", "SHARED_OUT", "check_shared_output",
]  # fmt: skip

if TYPE_CHECKING:  # the runner imports torch: not needed to check the --ray options
    from .runner import RunStats, ShardTask

# Replacements per worker of the run for actors whose process or node died (each loads the model).  A
# shard is retried on whichever actor is free, up to MAX_SHARD_ATTEMPTS times in all: a shard that kills
# every worker it touches (it should not: a bad image is an error record) stops the run instead of looping.
REPLACEMENTS_PER_WORKER = 3
MAX_SHARD_ATTEMPTS = 4
POLL_S = 0.5  # progress refresh of the driver's bar
DEFAULT_CPU_WORKER_CPUS = 4  # CPU workers: enough threads per model to be efficient, several per node
MAX_GPU_WORKER_CPUS = 8  # GPU workers: decode threads next to each GPU, at most this many by default


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray, which is not installed: pip install 'fastfeat[ray]'") from None
    return ray


def check_ray_options(workers: int | None, cpus_per_worker: float | None) -> None:
    """Before anything is imported or written: one-line errors for bad --ray-* values."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--ray-workers must be at least 1, got {workers}")
    if cpus_per_worker is not None and not (cpus_per_worker > 0 and math.isfinite(cpus_per_worker)):
        raise ConfigError(f"--ray-cpus-per-worker must be a positive number, got {cpus_per_worker:g}")


def worker_config(ex) -> WorkerConfig:
    """What every worker of the driver's run ``ex`` (an Extractor) builds its stages and sink from."""
    out = ex.output.path if ex.output.remote else os.path.abspath(ex.output.path)
    generations = tuple(g["ids_labels_sha256"] for g in ex.output.generations)
    return WorkerConfig(
        out=out, run_config=ex.output.config, generations=generations, stage=ex.stage_options, format=ex.format,
        image_column=ex.image_column, strict=ex.strict, read_retries=ex.read_retries,
    )  # fmt: skip


def _cluster_shape(ray) -> tuple[float, float, float]:
    """(total CPUs, total GPUs, CPUs of the largest alive node) of the cluster."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [n.get("Resources", {}).get("CPU", 0.0) for n in nodes]
    gpus = sum(n.get("Resources", {}).get("GPU", 0.0) for n in nodes)
    return sum(cpus), gpus, max(cpus, default=0.0)


def plan_workers(
    ray, shards: int, gpus_per_worker: float, workers: int | None, cpus_per_worker: float | None
) -> tuple[int, float]:
    """(number of actors, CPUs per actor): defaults fill the cluster, never more actors than shards."""
    total_cpus, total_gpus, largest = _cluster_shape(ray)
    if gpus_per_worker:
        if total_gpus < gpus_per_worker:
            raise ConfigError("the Ray cluster has no GPU; run the driver with --device cpu for CPU workers")
        fit = int(total_gpus // gpus_per_worker)
        cpus = cpus_per_worker or max(1.0, min(float(MAX_GPU_WORKER_CPUS), math.floor(total_cpus / total_gpus)))
    else:
        cpus = cpus_per_worker or max(1.0, min(float(DEFAULT_CPU_WORKER_CPUS), largest))
        fit = sum(int(n.get("Resources", {}).get("CPU", 0.0) // cpus) for n in ray.nodes() if n.get("Alive"))
    if cpus > largest:
        raise ConfigError(
            f"--ray-cpus-per-worker {cpus:g}: no node of the Ray cluster has that many CPUs (largest: {largest:g})"
        )
    return max(1, min(workers or fit, shards)), cpus


def _connect(ray, address: str | None) -> bool:
    """Connect (or start a local instance); True when this call did, so the run shuts it down again."""
    if ray.is_initialized():  # the Python API inside a Ray program (or a test) that already connected
        return False
    _check_reachable(address)
    try:
        # Workers' output goes to Ray's logs, not over the progress bar; their exceptions still reach ray.get.
        ray.init(address=address or None, log_to_driver=False, include_dashboard=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a local instance"
        raise ConfigError(f"cannot connect to Ray at {where}: {str(exc).splitlines()[0]}") from None
    return True


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) nobody listens on: one line now, not the minutes ray.init
    spends retrying before it gives up."""
    import socket

    target = (address or "").removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():  # "auto", none (a local instance), or a form left to ray.init
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"cannot connect to Ray at {address}: {exc.strerror or exc}") from None


def _sum_stats(parts: list[RunStats], wall_s: float) -> RunStats:
    from .runner import STAGES, THREADS, RunStats

    total = RunStats(wall_s=wall_s, busy=dict.fromkeys(STAGES, 0.0), wait=dict.fromkeys(THREADS, 0.0))
    for s in parts:
        total.rows, total.errors, total.warnings = (
            total.rows + s.rows,
            total.errors + s.errors,
            total.warnings + s.warnings,
        )
        for k, v in s.busy.items():
            total.busy[k] = total.busy.get(k, 0.0) + v
        for k, v in s.wait.items():
            total.wait[k] = total.wait.get(k, 0.0) + v
    return total


class _Dispatch:
    """The driver's loop: free actors take queued shards; results are committed; dead actors' shards requeued."""

    def __init__(self, ray, ex, spawn, n_workers: int, todo: list[ShardTask], bar):
        self.ray, self.ex, self.bar, self.spawn = ray, ex, bar, spawn
        self.actors: list = []  # every actor started, dead ones included: all are killed at the end
        self.replacements = REPLACEMENTS_PER_WORKER * n_workers
        self.queue: deque[ShardTask] = deque(todo)
        self.total_shards = len(ex.shards())
        self.attempts = dict.fromkeys((s.index for s in todo), 0)
        self.free: list = []
        self.running: dict = {}  # task ref -> (actor, shard)
        self.starting: dict = {}  # ready() ref -> actor: up (again) once it answers
        self.polls: dict = {}  # progress() ref -> actor
        self.partial: dict = {}  # actor -> images of its current shard written so far
        self.stats: list[RunStats] = []
        self.arrived: list = []  # (record, stats, shard) returned by workers, not yet in the manifest
        self.writers: set[tuple[str, int]] = set()  # (host, pid) of every worker process: their temp files
        self.retried = 0
        self.first_task: float | None = None  # when the first shard went out: the end of start-up
        self.shown = 0  # images on the bar
        self.committed_images = 0
        self.n_workers = n_workers

    def _start(self) -> None:
        actor = self.spawn()
        self.actors.append(actor)
        self.starting[actor.ready.remote()] = actor

    def alive(self) -> int:
        return len(self.free) + len(self.running)

    def run(self) -> None:
        try:
            self._loop()
        except BaseException:  # an error or Ctrl-C: shards already returned are kept, as in a local run
            with contextlib.suppress(Exception):
                self._commit()
            raise

    def _dispatch(self) -> None:
        while self.queue and self.free:
            actor, shard = self.free.pop(), self.queue.popleft()
            self.attempts[shard.index] += 1
            items = pack_items(self.ex.items[shard.first : shard.end])  # only this shard's items travel
            self.running[actor.run_shard.remote(shard, items)] = (actor, shard)
            if self.first_task is None:
                self.first_task = time.perf_counter()
            self.partial[actor] = 0

    def _loop(self) -> None:
        ray = self.ray
        for _ in range(self.n_workers):
            self._start()
        last_poll = 0.0
        while self.queue or self.running:
            self._dispatch()
            if not self.running and not self.starting:
                raise RayRunError(
                    "every Ray worker died and none could be replaced; finished shards are kept, run the same "
                    "command again to resume"
                )
            waiting = [*self.running, *self.starting, *self.polls]
            ready, _ = ray.wait(waiting, num_returns=1, timeout=POLL_S)
            ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0) if ready else (ready, None)
            for ref in ready:
                if ref in self.starting:
                    self._started(ref)
                elif ref in self.running:
                    self._finished(ref)
                else:
                    actor = self.polls.pop(ref)
                    with contextlib.suppress(Exception):  # a dead actor's poll: its task reports the death
                        self.partial[actor] = ray.get(ref)
            self._dispatch()  # free actors take their next shard first: the manifest write overlaps their work
            self._commit()
            if time.monotonic() - last_poll >= POLL_S:
                last_poll = time.monotonic()
                polled = set(self.polls.values())
                for actor, _shard in self.running.values():
                    if actor not in polled:
                        self.polls[actor.progress.remote()] = actor
                self._show()

    def _started(self, ref) -> None:
        ray = self.ray
        actor = self.starting.pop(ref)
        try:
            host, pid, _node, _threads = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed:  # the constructor raised: it would on every worker, stop the run
                line = _last_line(str(exc))
                if SHARED_OUT in line:  # check_shared_output's line, as it is
                    raise RayRunError(line[line.index(SHARED_OUT) :]) from None
                raise RayRunError(f"a Ray worker could not start: {line}") from None
            return  # died before it took any work (its node went away)
        self.writers.add((host, pid))
        self.free.append(actor)

    def _finished(self, ref) -> None:
        ray = self.ray
        actor, shard = self.running.pop(ref)
        self.partial.pop(actor, None)
        try:
            record, stats = ray.get(ref)
        except ray.exceptions.RayActorError:
            # The process or node died mid-shard: its temp files are never renamed (pid@host names), the
            # shard goes to the next free actor, and a new actor takes the dead one's place.  (Not Ray's own
            # max_restarts, which warns that a restarted actor's creation arguments in the object store, the
            # weights here, may be gone by then: ray-project/ray#53727.)
            if self.attempts[shard.index] >= MAX_SHARD_ATTEMPTS:
                raise RayRunError(
                    f"output shard {shard.index} failed on {MAX_SHARD_ATTEMPTS} Ray workers (their processes "
                    "died); finished shards are kept, see the Ray logs"
                ) from None
            self.retried += 1
            self.queue.appendleft(shard)
            if self.replacements > 0:  # a new actor, placed wherever Ray finds room (another node)
                self.replacements -= 1
                self._start()
            return
        except ray.exceptions.RayTaskError as exc:  # the runner raised (e.g. OSError writing): as a local run
            raise _cause(exc) from None
        self.arrived.append((record, stats, shard))
        self.free.append(actor)

    def _commit(self) -> None:
        """One manifest write for every shard that arrived since the last: while the driver writes, more
        finish, so the commits batch themselves and keep up with any number of workers."""
        new = {r.index: (r, st, sh) for r, st, sh in self.arrived if r.index not in self.ex.output.shards}
        self.arrived = []
        if not new:  # a shard done twice is the same bytes: committed once
            return
        for record, _stats, _shard in new.values():
            if not _visible(self.ex.output, record):  # never list a file the driver (and readers) cannot see
                from . import storage

                raise RayRunError(
                    f"{SHARED_OUT}: a Ray worker wrote output shard {record.index} ({record.file}), which the "
                    f"driver does not find in {storage.display(self.ex.output.path)} (a folder local to each node?)"
                )
        self.ex.output.commit_shards([r for r, _, _ in new.values()])
        for _record, stats, shard in new.values():
            self.committed_images += shard.end - shard.first
            self.stats.append(stats)
            if self.bar is not None and stats.errors:
                self.bar.update(0, stats.errors)
        self._show()

    def _show(self) -> None:
        if self.bar is None:
            return
        now = self.committed_images + sum(self.partial.get(a, 0) for a, _ in self.running.values())
        if now > self.shown:  # a retried shard's lost progress is not taken back: the bar never goes down
            self.bar.update(now - self.shown)
            self.shown = now
        self.bar.status(f"shards {len(self.ex.output.shards)}/{self.total_shards}, workers {self.alive()}")


def _last_line(text: str) -> str:
    """The exception line at the end of a remote traceback."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def _cause(exc) -> BaseException:
    """The exception a worker raised, unwrapped from Ray's (a one-line error for the CLI)."""
    cause = getattr(exc, "cause", None)
    if cause is None:
        cause = getattr(getattr(exc, "error", None), "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def run_on_ray(
    ex, address: str | None = None, workers: int | None = None, cpus_per_worker: float | None = None,
    gpus_per_worker: float | None = None, on_batch=None,
) -> dict:  # fmt: skip
    """Run the validated and planned ``ex`` (an :class:`Extractor`) on Ray; returns the run summary.

    ``gpus_per_worker``: 1 when the run's device is CUDA, else 0 (a test may ask for logical GPUs).
    ``on_batch``: a picklable hook every worker calls with the shard's index after each batch (fault
    tests inject :class:`fastfeat.testing.HoldShard`); None in a normal run.
    """
    from .console import console
    from .output import remove_tmp_of
    from .summary import ProgressBar

    check_ray_options(workers, cpus_per_worker)
    if ex.up_to_date():
        return ex.run()  # nothing to do: the last summary, without starting Ray
    ray = import_ray()
    gpus = (1.0 if ex.device.type == "cuda" else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
    started_ray = _connect(ray, address)
    dispatch = None
    try:
        pending = [s for s in ex.shards() if s.index not in ex.output.shards]
        n_workers, cpus = plan_workers(ray, max(1, len(pending)), gpus, workers, cpus_per_worker)
        tensors = _put_weights(ray, ex.weights.tensors)  # before OUT/ exists: a full store writes nothing
        todo, done_items, total = ex.begin()  # everything is checked: OUT/ is created only now
        worker = ray.remote(ShardWorker).options(num_cpus=cpus, num_gpus=gpus, max_concurrency=2)
        config = worker_config(ex)
        spawn = partial(worker.remote, config, tensors, on_batch)
        with redirect_stderr(console()):
            bar = ProgressBar(total) if ex.progress and total else None
            try:
                dispatch = _Dispatch(ray, ex, spawn, n_workers, todo, bar)
                dispatch.run()
            finally:
                if bar is not None:
                    bar.close()
        # As in a single-process run, start-up (listing, connecting, the first actor's model load) is
        # not in wall_s: the run starts with its first shard.
        end = time.perf_counter()
        first = dispatch.first_task or end
        startup_s, wall = first - ex.started, end - first
    finally:
        actors = dispatch.actors if dispatch is not None else []
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if dispatch is not None and dispatch.writers:
            _wait_gone(ray, actors)
            # Its own workers, now killed: their temp files (a shard cut short) are provably orphans.
            with contextlib.suppress(OSError):
                remove_tmp_of(ex.out, dispatch.writers)
        if started_ray:
            ray.shutdown()
    stats = _sum_stats(dispatch.stats, wall)
    ray_info = {
        "address": address or "local", "workers": n_workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus,
        "retried_shards": dispatch.retried,
    }  # fmt: skip
    return ex.end(stats, total, done_items, startup_s, workers=n_workers, ray=ray_info)


def _put_weights(ray, tensors: dict):
    """The weights in the object store, once, shared by every actor; a one-line error where the store is
    full and Ray may not spill to disk (it refuses once the disk is 95% full: ``local_fs_capacity_threshold``)."""
    try:
        return ray.put(tensors)
    except (ray.exceptions.OutOfDiskError, ray.exceptions.ObjectStoreFullError) as exc:
        size_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
        reason = next(iter(str(exc).strip().splitlines()), type(exc).__name__)  # Ray's first line says it
        raise RayRunError(
            f"Ray could not store the model weights ({size_mb:.0f} MB): {reason} (free disk "
            "space on the driver's node, or give Ray a larger object store: ray start --object-store-memory)"
        ) from None


def _wait_gone(ray, actors: list, timeout: float = 10.0) -> None:
    """Until every killed actor's process is gone (a method call fails), so no temp file is being written."""
    deadline = time.monotonic() + timeout
    for actor in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(actor.ready.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                break
            time.sleep(0.05)


def _visible(out, record) -> bool:
    """Whether every file of a shard a worker wrote is in OUT/ as the driver sees it, with its size."""
    from . import storage

    for f in record.files():
        location = storage.join(out.path, f["file"])
        try:
            size = storage.info(location).size if out.remote else os.path.getsize(location)
        except OSError:
            return False
        if size != f["bytes"]:
            return False
    return True
