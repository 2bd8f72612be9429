"""Run the fastfeat CLI with a hold, for tests that kill a run at a known point (no sleeps, no races).

    python tests/hold_at.py MARKER TARGET N MATCH -- <fastfeat arguments>

TARGET is ``module:attribute.path`` (``fastfeat.output:ShardTransaction.add``, ``os:replace``).  The N-th
call of it whose arguments' repr contains MATCH (``""``: every call) first creates the file MARKER and then
blocks forever, before the call runs.  The test waits for MARKER, so it knows exactly where the process
stands when it sends SIGKILL.  If the process ends without creating MARKER, the hold point was never
reached and the test says so.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import time


def hold(marker: str, target: str, nth: int, match: str) -> None:
    module, _, attr = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0
    lock = threading.Lock()

    def held(*args, **kwargs):
        nonlocal calls
        if not match or match in repr((args, kwargs)):
            with lock:
                calls += 1
                reached = calls == nth
            if reached:
                open(marker, "w").close()
                threading.Event().wait()  # until the test kills the process
        return original(*args, **kwargs)

    setattr(owner, name, held)


def start_held(fastfeat_args: list[str], folder, target: str, nth: int, match: str = "") -> subprocess.Popen:
    """Start ``fastfeat <fastfeat_args>`` held at the ``nth`` matching call of ``target``; return it once held."""
    marker = os.path.join(folder, f"held-{time.monotonic_ns()}")
    log = open(marker + ".log", "w+")
    cmd = [sys.executable, os.path.abspath(__file__), marker, target, str(nth), match, "--", *fastfeat_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)  # the environment (AWS_* too) is inherited
    while not os.path.exists(marker):
        if proc.poll() is not None:  # waiting for the marker, not for a time: no sleep decides anything
            log.seek(0)
            raise AssertionError(
                f"{target} call {nth} matching {match!r} never came; the run said:\n{log.read()[-3000:]}"
            )
        time.sleep(0.01)
    return proc


if __name__ == "__main__":
    marker, target, nth, match, sep, *argv = sys.argv[1:]
    if sep != "--":
        raise SystemExit("usage: hold_at.py MARKER TARGET N MATCH -- <fastfeat arguments>")
    sys.path[0] = os.getcwd()  # as under `python -m fastfeat`: not tests/, whose modules could shadow others
    hold(marker, target, int(nth), match)
    from fastfeat.cli import main

    sys.exit(main(argv))
