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
features, as in ``extract``.  A failure that is not an image's (out of memory, a CUDA error) fails
the jobs of that batch only; the threads keep serving.
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

    # -- the request side -----------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> bool:
        """Admit all of ``jobs`` or none (False: over ``max_queue``, the caller answers 429)."""
        with self._cond:
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
                    if job.state == QUEUED:
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

    # -- the threads ----------------------------------------------------------------------------
    def start(self) -> None:
        for name, target in (("decode", self._decode_loop), ("forward", self._forward_loop)):
            t = threading.Thread(target=target, name=f"fastfeat-serve-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)

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
                    return batch

    def _decode_loop(self) -> None:
        while (jobs := self._next_batch()) is not None:
            closed = time.perf_counter()
            try:
                images, bad, warned = self.decode([j.encoded for j in jobs], [j.size for j in jobs])
            except Exception as exc:  # not an image's fault (DALI reports those per sample): fail this batch only
                self._fail(jobs, exc)
                continue
            for job in jobs:
                job.encoded = None  # the bytes are no longer needed: don't hold them through the forward pass
            item = (jobs, images, bad, warned, closed, time.perf_counter() - closed)
            while not self._stopping:
                try:
                    self._handoff.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
        self._handoff.put(_END)

    def _forward_loop(self) -> None:
        while (item := self._handoff.get()) is not _END:
            jobs, images, bad, warned, closed, decode_s = item
            good = [i for i in range(len(jobs)) if i not in bad]
            t0 = time.perf_counter()
            try:
                feats = self.forward(images, good) if images is not None and good else {}
            except Exception as exc:
                self._fail(jobs, exc)
                continue
            forward_s = time.perf_counter() - t0
            self.on_batch(len(jobs), decode_s, forward_s)
            row = {i: r for r, i in enumerate(good)}
            for i, job in enumerate(jobs):
                common = dict(batch_size=len(jobs), queue_s=closed - job.submitted, decode_s=decode_s,
                              forward_s=forward_s, warning=warned.get(i))  # fmt: skip
                if i in row:
                    result = JobResult(features={n: f[row[i]] for n, f in feats.items()}, **common)
                else:
                    result = JobResult(error=bad.get(i, "could not be decoded"), **common)
                self._finish(job, result)

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        for job in jobs:
            self._finish(job, JobResult(failure=message, batch_size=len(jobs)))

    def _finish(self, job: Job, result: JobResult) -> None:
        with self._cond:
            if job.state == CANCELLED:
                return
            job.state = DONE
            self._admitted -= 1
        job.done(result)
