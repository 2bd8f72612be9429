"""``--devices``' supervisor (fastfeat.launch.supervise) with fake workers: small Python processes held on a
fifo or until a signal, never on a sleep.  The supervising parent runs in a subprocess of its own, so that
the test can signal it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

# A fake worker: installs its SIGINT/SIGTERM handler (which writes <name>.signal and exits 0), then says
# "<name>" on the shared ready fifo; then either waits for a signal, or (given a fifo of its own) reads
# one line from it and exits with the status it names.
WORKER = r"""
import os, signal, sys
folder, name = sys.argv[1], sys.argv[2]
def on_signal(signum, frame):
    with open(os.path.join(folder, name + ".signal"), "w") as f:
        f.write(str(signum))
    sys.exit(0)
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)
with open(os.path.join(folder, "ready"), "w") as f:
    f.write(name + "\n")
if len(sys.argv) > 3:
    with open(sys.argv[3]) as f:
        sys.exit(int(f.readline()))
signal.pause()
"""

PARENT = r"""
import json, sys
from fastfeat.launch import supervise
sys.exit(supervise([tuple(w) for w in json.loads(sys.argv[1])], grace_s=60))
"""


def _workers(folder: str, n: int, failing: dict[int, str] | None = None) -> list:
    import json

    workers = []
    for i in range(n):
        argv = [sys.executable, "-c", WORKER, folder, f"w{i}"]
        if failing and i in failing:
            argv.append(failing[i])
        workers.append((f"worker {i} (GPU {i})", argv, None))
    return json.dumps(workers)


def _wait_ready(folder: str, n: int) -> set[str]:
    """Read the ready fifo until n workers said their name (each opens it, writes a line and closes it)."""
    names: set[str] = set()
    while len(names) < n:
        with open(os.path.join(folder, "ready")) as f:  # blocks until a worker opens it to write
            names |= {line.strip() for line in f if line.strip()}
    return names


def _start(tmp_path, n: int, failing: dict[int, str] | None = None) -> subprocess.Popen:
    os.mkfifo(tmp_path / "ready")
    for path in (failing or {}).values():
        os.mkfifo(path)
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, _workers(str(tmp_path), n, failing)], stderr=subprocess.PIPE, text=True
    )
    assert _wait_ready(str(tmp_path), n) == {f"w{i}" for i in range(n)}
    return parent


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_parent_reaches_every_worker(signum, tmp_path):
    parent = _start(tmp_path, 3)
    parent.send_signal(signum)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 128 + signum, err
    assert [(tmp_path / f"w{i}.signal").read_text() for i in range(3)] == [str(int(signum))] * 3


def test_a_failed_worker_stops_its_siblings_and_is_named(tmp_path):
    fail = str(tmp_path / "fail1")
    parent = _start(tmp_path, 3, failing={1: fail})
    with open(fail, "w") as f:
        f.write("3\n")  # worker 1 exits with status 3
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 3
    lines = err.strip().splitlines()
    assert lines == ["fastfeat: worker 1 (GPU 1) failed (exit status 3); the other workers were stopped"], err
    # its siblings got SIGTERM (their handler ran: they were not left writing)
    assert [(tmp_path / f"w{i}.signal").read_text() for i in (0, 2)] == [str(int(signal.SIGTERM))] * 2
    assert not (tmp_path / "w1.signal").exists()


def test_workers_that_all_succeed_give_status_zero(tmp_path):
    fifos = {i: str(tmp_path / f"go{i}") for i in range(2)}
    parent = _start(tmp_path, 2, failing=fifos)
    for path in fifos.values():
        with open(path, "w") as f:
            f.write("0\n")
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 0 and err == ""
