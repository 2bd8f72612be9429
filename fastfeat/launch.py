"""``--devices``: one ``fastfeat extract`` worker process per GPU, all writing one output directory.

Worker i runs the same command with ``--num-shards K --shard-index i --device cuda:D_i``;
the parts take disjoint output shards and merge them into one manifest under a
file lock (fastfeat.writer), so together they equal a single-process run.
"""

from __future__ import annotations

import subprocess
import sys


def parse_devices(devices: str) -> list[int]:
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise ValueError("--devices needs CUDA GPUs; use --num-shards/--shard-index to split work on CPU")
    if devices == "auto":
        return list(range(available))
    try:
        ids = [int(d) for d in devices.split(",") if d.strip()]
    except ValueError:
        raise ValueError(f"--devices must be 'auto' or a list like 0,1, got {devices!r}") from None
    bad = [d for d in ids if not 0 <= d < available]
    if not ids or bad or len(set(ids)) != len(ids):
        raise ValueError(f"--devices {devices!r}: choose distinct GPUs among 0..{available - 1}")
    return ids


def worker_argv(argv: list[str], index: int, count: int, device: int) -> list[str]:
    """The worker's command line: argv without --devices/--device/--num-shards/--shard-index, plus its part."""
    out, skip = [], False
    drop = ("--devices", "--device", "--num-shards", "--shard-index")
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in drop:
            skip = True
            continue
        if any(arg.startswith(d + "=") for d in drop):
            continue
        out.append(arg)
    extra = ["--num-shards", str(count), "--shard-index", str(index), "--device", f"cuda:{device}"]
    if index > 0:
        extra.append("--no-progress")  # one progress bar is readable, several interleaved are not
    return [sys.executable, "-m", "fastfeat", *out, *extra]


def launch_per_device(devices: str, argv: list[str]) -> int:
    ids = parse_devices(devices)
    procs = [subprocess.Popen(worker_argv(argv, i, len(ids), d)) for i, d in enumerate(ids)]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)
