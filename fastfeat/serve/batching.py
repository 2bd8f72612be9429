"""Dynamic batching: images of concurrent requests coalesced into one decode and one forward pass.

Two threads, like extract's runner (the decode of batch i+1 overlaps the forward pass of batch i):

    submit(jobs) ──► waiting (deque) ──► decode thread ──► hand-off (1 batch) ──► forward thread ──► done(job)

A batch closes when it holds ``max_batch`` images or when its oldest image has waited
``max_delay``, whichever comes first; under load, images queue while the forward pass runs, so the
next batch is already full and no delay is added.

Admission is bounded: ``submit`` refuses (the server answers 429) when the images admitted and not
yet answered would exceed ``max_queue``.  A cancelled job (its client went away) leaves the count at
once; if it is still waiting it never reaches the decoder.

A bad image is the decoder's per-sample error: it gets its error and the others in its batch get their
features, as in ``extract``.  A failure that is not an image's (out of memory, a CUDA error, or a bug
anywhere in a batch's handling, not only in decode and forward) fails the jobs of that batch only; the
threads keep serving.  Should a thread die all the same (a BaseException), :attr:`Batcher.alive` turns
False, every job not yet answered gets a failure, and ``submit`` raises :class:`BatcherDead`: nothing
waits for a thread that is gone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"
_END = object()


@dataclass
class JobResult:
    features: dict[str, np.ndarray] | None = None  # layer -> [dim] float32 row, None when the image failed
    error: str | None = None  # the decoder's reason for this image
    warning: str | None = None  # decoded despite a recoverable problem (the decoder's message)
    failure: str | None = None  # the server's failure, not the image's (the batch could not run)
    batch_size: int = 0
    queue_s: float = 0.0  # submit -> its batch closed
    decode_s: float = 0.0  # its batch's decode
    forward_s: float = 0.0  # its batch's forward pass (with the copies to and from the device)


@dataclass(eq=False)
class Job:
    encoded: np.ndarray
    size: tuple[int, int]
    done: Callable[[JobResult], None]  # called once, from a batcher thread, unless the job was cancelled
    submitted: float = field(default_factory=time.perf_counter)
    state: str = QUEUED


class BatcherDead(RuntimeError):
    """The batching threads are not running: a request can only be refused."""


class Batcher:
    def __init__(
        self,
        decode: Callable,
        forward: Callable[[object, list[int]], dict[str, np.ndarray]],
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[int, float, float], None] | None = None,
    ):
        self.decode, self.forward = decode, forward
        self.max_batch, self.max_delay_s, self.max_queue = max_batch, max_delay_s, max_queue
        self.on_batch = on_batch or (lambda size, decode_s, forward_s: None)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._admitted = 0  # submitted, neither answered nor cancelled
        self._handoff: queue.Queue = queue.Queue(maxsize=1)
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._running: set[Job] = set()  # jobs taken from the queue and not yet answered
        self.death: str | None = None  # why a thread ended while the batcher was not stopping

    # -- the request side -----------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> bool:
        """Admit all of ``jobs`` or none (False: over ``max_queue``, the caller answers 429)."""
        with self._cond:
            if self.death is not None:
                raise BatcherDead(self.death)
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if self._admitted + len(jobs) > self.max_queue:
                return False
            self._admitted += len(jobs)
            self._waiting.extend(jobs)
            self._cond.notify_all()
        return True

    def cancel(self, jobs: list[Job]) -> int:
        """Forget jobs whose client went away: their slots are free at once. Returns how many were pending."""
        n = 0
        with self._cond:
            for job in jobs:
                if job.state in (QUEUED, RUNNING):
                    if job.state == QUEUED and job in self._waiting:  # (a dead batcher's queue is empty)
                        self._waiting.remove(job)
                    job.state = CANCELLED
                    self._admitted -= 1
                    n += 1
        return n

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def alive(self) -> bool:
        """Both threads started and running (False before start, after stop, and once one has died)."""
        return bool(self._threads) and self.death is None and all(t.is_alive() for t in self._threads)

    # -- the threads ----------------------------------------------------------------------------
    def start(self) -> None:
        for name, target in (("decode", self._decode_loop), ("forward", self._forward_loop)):
            t = threading.Thread(target=self._guarded, args=(name, target), name=f"fastfeat-serve-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)

    def _guarded(self, name: str, loop: Callable[[], None]) -> None:
        """Run a thread's loop; if it ends other than by stop(), the batcher is dead: say so and answer
        every job it holds, so that no request waits for a thread that is gone."""
        try:
            loop()
        except BaseException as exc:
            self._died(f"the {name} thread stopped: {type(exc).__name__}: {exc}"[:300])
            raise
        if not self._stopping:
            self._died(f"the {name} thread stopped")

    def _died(self, why: str) -> None:
        with self._cond:
            self.death = self.death or why
            stranded = [*self._waiting, *self._running]
            self._waiting.clear()
            if self._threads:
                self._stopping = True  # the other thread ends too; submit() answers BatcherDead
            self._cond.notify_all()
        for job in stranded:
            self._finish(job, JobResult(failure=why))
        if self._threads:  # wake a forward thread that waits for a hand-off that will never come
            try:
                self._handoff.put_nowait(_END)
            except queue.Full:
                pass

    def _next_batch(self) -> list[Job] | None:
        """Block until a batch closes (full, or its oldest image waited max_delay); None when stopping."""
        with self._cond:
            while True:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                deadline = self._waiting[0].submitted + self.max_delay_s
                while self._waiting and len(self._waiting) < self.max_batch and not self._stopping:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._waiting:  # (all of them may have been cancelled meanwhile: wait again)
                    batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
                    for job in batch:
                        job.state = RUNNING
                    self._running.update(batch)
                    return batch

    def _decode_loop(self) -> None:
        while (jobs := self._next_batch()) is not None:
            try:
                item = self._decode_batch(jobs)
            except Exception as exc:  # not an image's fault (DALI reports those per sample): fail this batch only
                self._fail(jobs, exc)
                continue
            while not self._stopping:
                try:
                    self._handoff.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            else:
                self._fail(jobs, RuntimeError("the server is shutting down"))
        while True:  # the forward thread ends on _END; a dead one takes nothing, so never block on it
            try:
                self._handoff.put(_END, timeout=0.1)
                break
            except queue.Full:
                if self.death is not None:
                    break

    def _decode_batch(self, jobs: list[Job]) -> tuple:
        closed = time.perf_counter()
        images, bad, warned = self.decode([j.encoded for j in jobs], [j.size for j in jobs])
        for job in jobs:
            job.encoded = None  # the bytes are no longer needed: don't hold them through the forward pass
        return (jobs, images, bad, warned, closed, time.perf_counter() - closed)

    def _forward_loop(self) -> None:
        while (item := self._handoff.get()) is not _END:
            try:
                self._forward_batch(*item)
            except Exception as exc:  # forward, or anything after it: this batch's unanswered jobs fail
                self._fail(item[0], exc)

    def _forward_batch(self, jobs, images, bad, warned, closed, decode_s) -> None:
        good = [i for i in range(len(jobs)) if i not in bad]
        t0 = time.perf_counter()
        feats = self.forward(images, good) if images is not None and good else {}
        forward_s = time.perf_counter() - t0
        self.on_batch(len(jobs), decode_s, forward_s)
        row = {i: r for r, i in enumerate(good)}
        results = []
        for i, job in enumerate(jobs):  # every result made before any is sent: a batch succeeds or fails whole
            common = dict(batch_size=len(jobs), queue_s=closed - job.submitted, decode_s=decode_s,
                          forward_s=forward_s, warning=warned.get(i))  # fmt: skip
            if i in row:
                results.append(JobResult(features={n: f[row[i]] for n, f in feats.items()}, **common))
            else:
                results.append(JobResult(error=bad.get(i, "could not be decoded"), **common))
        for job, result in zip(jobs, results, strict=True):
            self._finish(job, result)

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        for job in jobs:
            self._finish(job, JobResult(failure=message, batch_size=len(jobs)))

    def _finish(self, job: Job, result: JobResult) -> None:
        with self._cond:
            self._running.discard(job)
            if job.state in (CANCELLED, DONE):  # a failure after some jobs were answered: those keep theirs
                return
            job.state = DONE
            self._admitted -= 1
        job.done(result)
