"""One long-format results file for every benchmark: benchmarks/results/results.csv.

Columns: kernel (or layer/pipeline), provider, shape, dtype, batch, metric, p20, p50, p80,
device, git_sha, date.  Scripts append rows; ``plot.py`` draws them.
"""

from __future__ import annotations

import csv
import datetime
import os
import subprocess

import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), "results", "results.csv")
COLUMNS = ["kernel", "provider", "shape", "dtype", "batch", "metric", "p20", "p50", "p80", "device", "git_sha", "date"]


def git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        # Uncommitted changes to the measured code: the sha alone would name code that did not run.
        changed = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "--", "../fastfeat", "../kernels"],
            capture_output=True, text=True,
        )  # fmt: skip
        return sha.stdout.strip() + ("-dirty" if changed.stdout.strip() else "")
    except OSError:
        return ""


def device_name(device: str = "cpu") -> str:
    """The CPU model or GPU name the numbers come from (fastfeat profile's wording)."""
    import torch

    from fastfeat.runtime import device_name as _device_name

    return _device_name(torch.device(device), with_threads=True)


def percentiles(samples) -> tuple[float, float, float]:
    p20, p50, p80 = np.percentile(np.asarray(samples, dtype=np.float64), [20, 50, 80])
    return float(p20), float(p50), float(p80)


def append(rows: list[dict], path: str = RESULTS) -> None:
    """Append rows (dicts with COLUMNS keys; git_sha/date filled in) to the results CSV."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    sha, date = git_sha(), datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"git_sha": sha, "date": date, **r})
