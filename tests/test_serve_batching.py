"""The batcher on its own (fastfeat.serve.batching): how batches are cut, admission, cancellation and
failure isolation, with plain functions for decode and forward that record what they were given."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fastfeat.serve.batching import Batcher, BatcherDead, Job, JobResult

TIMEOUT_S = 30


class Recorder:
    """decode/forward that record their batches; an image is its own feature (a 1-value row)."""

    def __init__(self, bad_values=(), fail_batches=()):
        self.decoded: list[list[int]] = []
        self.bad_values, self.fail_batches = set(bad_values), set(fail_batches)

    def decode(self, encoded, sizes):
        values = [int(e[0]) for e in encoded]
        self.decoded.append(values)
        if len(self.decoded) - 1 in self.fail_batches:
            raise RuntimeError("out of memory")
        bad = {i: "corrupt" for i, v in enumerate(values) if v in self.bad_values}
        return np.array(values, np.float32)[:, None], bad, {}

    def forward(self, images, good):
        return {"f": images[good] * 10}


def _jobs(values, results: dict, done: threading.Event | None = None, expect: int = 0) -> list[Job]:
    def finish(v, r: JobResult):
        results[v] = r
        if done is not None and len(results) == expect:
            done.set()

    return [Job(np.array([v], np.uint8), (1, 1), lambda r, v=v: finish(v, r)) for v in values]


def _run(batcher: Batcher, jobs: list[Job], results: dict, done: threading.Event) -> None:
    assert batcher.submit(jobs)
    batcher.start()
    try:
        assert done.wait(TIMEOUT_S)
    finally:
        batcher.stop()


def test_batches_are_cut_at_max_batch_in_arrival_order():
    rec, results, done = Recorder(), {}, threading.Event()
    sizes = []
    batcher = Batcher(rec.decode, rec.forward, 4, 0.05, 64, on_batch=lambda n, d, f: sizes.append(n))
    _run(batcher, _jobs(range(10), results, done, 10), results, done)
    assert rec.decoded == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and sizes == [4, 4, 2]
    assert all(results[v].features["f"][0] == 10 * v for v in range(10))
    assert [results[v].batch_size for v in range(10)] == [4] * 8 + [2] * 2
    assert batcher.admitted == 0


def test_a_lone_image_is_not_held_for_a_full_batch():
    rec, results, done = Recorder(), {}, threading.Event()
    _run(Batcher(rec.decode, rec.forward, 64, 0.01, 64), _jobs([5], results, done, 1), results, done)
    assert rec.decoded == [[5]] and results[5].features["f"][0] == 50


def test_admission_is_all_or_nothing():
    batcher = Batcher(Recorder().decode, Recorder().forward, 2, 0.0, 4)
    assert batcher.submit(_jobs([1, 2, 3], {}))
    assert not batcher.submit(_jobs([4, 5], {}))  # 3 + 2 > 4: refused whole
    assert batcher.admitted == 3 and batcher.waiting == 3
    assert batcher.submit(_jobs([6], {})) and batcher.admitted == 4


def test_cancelled_jobs_free_their_slots_and_are_never_decoded():
    rec, results, done = Recorder(), {}, threading.Event()
    batcher = Batcher(rec.decode, rec.forward, 8, 0.0, 4)
    jobs = _jobs([1, 2, 3, 4], results, done, 2)
    assert batcher.submit(jobs)
    assert not batcher.submit(_jobs([7], {}))  # full
    assert batcher.cancel([jobs[1], jobs[2]]) == 2 and batcher.admitted == 2
    assert batcher.cancel([jobs[1]]) == 0  # twice is once
    _run(batcher, _jobs([7], results), results, done)  # the freed slots take a new image
    assert rec.decoded == [[1, 4, 7]] and sorted(results) == [1, 4, 7]
    assert batcher.admitted == 0


def test_bad_image_and_failed_batch_stay_with_their_own_jobs():
    rec, results, done = Recorder(bad_values={2}, fail_batches={1}), {}, threading.Event()
    batcher = Batcher(rec.decode, rec.forward, 3, 0.0, 64)
    _run(batcher, _jobs(range(9), results, done, 9), results, done)
    assert rec.decoded == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert results[2].error == "corrupt" and results[2].features is None  # the bad image: its own error
    assert results[0].features["f"][0] == 0 and results[1].features["f"][0] == 10  # its batch-mates: features
    assert all("out of memory" in results[v].failure for v in (3, 4, 5))  # the failed batch only
    assert all(results[v].features["f"][0] == 10 * v for v in (6, 7, 8))  # and the server went on


def test_submit_after_stop_raises():
    batcher = Batcher(Recorder().decode, Recorder().forward, 1, 0.0, 1)
    batcher.start()
    batcher.stop()
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(_jobs([1], {}))


def test_a_failure_outside_forward_fails_that_batch_only():
    """A bug after the forward call (here the metrics callback) fails the jobs of its batch, not the thread."""
    rec, results, done = Recorder(), {}, threading.Event()
    calls = []

    def on_batch(size, decode_s, forward_s):
        calls.append(size)
        if len(calls) == 2:
            raise ValueError("bad metric")

    batcher = Batcher(rec.decode, rec.forward, 2, 0.0, 64, on_batch=on_batch)
    _run(batcher, _jobs(range(6), results, done, 6), results, done)
    assert all("bad metric" in results[v].failure for v in (2, 3))
    assert all(results[v].features["f"][0] == 10 * v for v in (0, 1, 4, 5)) and batcher.admitted == 0


class _Killed(BaseException):
    """Escapes `except Exception`: the thread that raises it dies."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_thread_answers_its_jobs_and_refuses_new_ones():
    rec, results, done = Recorder(), {}, threading.Event()

    def on_batch(size, decode_s, forward_s):
        raise _Killed("gone")

    batcher = Batcher(rec.decode, rec.forward, 2, 0.0, 64, on_batch=on_batch)
    assert not batcher.alive  # not started yet
    jobs = _jobs(range(5), results, done, 5)  # the first batch kills the thread; the rest must not wait
    assert batcher.submit(jobs)
    batcher.start()
    try:
        assert done.wait(TIMEOUT_S)
        assert not batcher.alive and "forward thread stopped: _Killed: gone" in batcher.death
        assert all(results[v].failure for v in range(5)) and batcher.admitted == 0
        with pytest.raises(BatcherDead, match="forward thread stopped"):
            batcher.submit(_jobs([9], {}))
    finally:
        batcher.stop()
