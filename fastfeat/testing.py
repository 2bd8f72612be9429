"""Support for fastfeat's own fault tests, injected by them; no production path imports this module.

:class:`HoldShard` is the Ray worker's ``on_batch`` hook (``run_on_ray(..., on_batch=HoldShard(folder))``):
it lives in the package, not under tests/, so that every Ray worker process can unpickle it.
"""

from __future__ import annotations

import json
import os
import time


class HoldShard:
    """A worker about to write a batch of the shard whose index is in ``<folder>/hold`` claims
    ``<folder>/held`` (once: created exclusively, with its pid, host and Ray node) and waits there,
    mid-shard with its temp file open, until ``hold`` is removed.  A test kills it meanwhile."""

    def __init__(self, folder: str, timeout_s: float = 120.0):
        self.folder, self.timeout_s = str(folder), timeout_s

    def __call__(self, index: int) -> None:
        hold = os.path.join(self.folder, "hold")
        try:
            with open(hold, encoding="utf-8") as f:
                if f.read().strip() != str(index):
                    return
            fd = os.open(os.path.join(self.folder, "held"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except OSError:  # no hold, or another attempt already held: go on
            return
        import ray

        from .output import host_tag

        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": host_tag(), "node_id": ray.get_runtime_context().get_node_id()}, f)
        deadline = time.monotonic() + self.timeout_s  # never hang a forgotten test forever
        while os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.05)
