"""A real ``fastfeat serve`` process on 127.0.0.1 for the serve tests, and how to compare features."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np

START_TIMEOUT_S = 120  # model load + warm-up; a few seconds on the dev box
_URL = re.compile(r"listening on (http://127\.0\.0\.1:\d+/)")


class ServerProcess:
    """``python -m fastfeat serve ARGS --port 0``; ``url`` once it listens; ``stop()`` sends SIGTERM."""

    def __init__(self, *args: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "fastfeat", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        self.stderr: list[str] = []
        self.lines = lines = queue.Queue()  # stdout lines; those after the listening line stay here
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        threading.Thread(target=lambda: [self.stderr.append(x) for x in self.proc.stderr], daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        self.url = None
        while self.url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(
                    f"server did not start in {START_TIMEOUT_S} s: {''.join(self.stderr)[-2000:]}"
                ) from None
            if m := _URL.search(line):
                self.url = m.group(1).rstrip("/")
            elif self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {''.join(self.stderr)[-2000:]}")
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; uvicorn shuts down gracefully, then re-raises the signal."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| of one image's feature vector (b the reference)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def extract_rows(out: str, layer: str) -> dict[str, np.ndarray]:
    """id -> row of ``layer`` of an npy-format extract output, read through its manifest."""
    import pyarrow.parquet as pq

    manifest = json.load(open(os.path.join(out, "manifest.json")))
    rows = {}
    for shard in manifest["shards"]:
        ids = pq.read_table(os.path.join(out, shard["file"]), columns=["id"]).column(0).to_pylist()
        matrix = np.load(os.path.join(out, shard["file"].replace(".ids.parquet", f".{layer}.npy")))
        rows.update(zip(ids, matrix, strict=True))
    return rows


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of a Prometheus text page (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def stopped_cleanly(server: ServerProcess) -> bool:
    """Stopped by our SIGTERM after a graceful shutdown (uvicorn re-raises the signal), with no traceback."""
    code = server.stop()
    return code in (0, -signal.SIGTERM) and "Traceback" not in "".join(server.stderr)
