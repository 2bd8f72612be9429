"""The machine and the process: device, precision, CPU features, versions, allocator tuning.

Shared by ``extract``, ``profile`` and the benchmarks, so that all three resolve ``--device auto``
and the default precision the same way and record the same machine description.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import torch

from .errors import ConfigError
from .version import __version__

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a device that exists on this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"bad device {device!r}; use cuda or cuda:N") from None
        if dev.index is not None and not 0 <= dev.index < torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise ConfigError(f"unknown device {device!r}; choose auto, cpu or cuda[:N]")


def make_current(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device (nothing on CPU).

    The current device is per thread and is what Triton launches on (with that device's current
    stream), whatever device the tensors are on; it is also where a device-less CUDA call (a context,
    a synchronize) goes.  Every thread that runs GPU work for ``--device cuda:N`` calls this first.
    """
    if device.type == "cuda":
        # torch.cuda.set_device refuses a device without an index ("cuda", "auto"): that one means the
        # current device, which is already current.
        torch.cuda.set_device(device if device.index is not None else torch.cuda.current_device())


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def cpu_has_bf16() -> bool:
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_precision(device: torch.device) -> str:
    """bf16 where the hardware computes it natively (CPU avx512_bf16/AMX, GPU sm80+), else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def resolve_precision(precision: str | None, device: torch.device) -> str:
    precision = precision or default_precision(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return precision


def device_name(device: torch.device, with_threads: bool = False) -> str:
    """The GPU's name, or the CPU's model name (and torch's thread count, for timings)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")), "cpu"
    )
    return f"{model}, {torch.get_num_threads()} threads" if with_threads else model


def library_versions() -> dict:
    """Versions that can change a feature value: part of a run's configuration."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"fastfeat": __version__, "torch": torch.__version__}
    for dist in ("nvidia-dali-cuda130", "pillow", "triton"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def git_sha() -> str | None:
    """The commit of the checkout fastfeat runs from, for results files; None when not a git checkout."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _libc():
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give the freed pages of every heap back to the OS (glibc ``malloc_trim``).

    ``keep_freed_memory`` keeps freed blocks so the next batch does not page-fault them in again,
    but blocks freed by one thread and sized for another fragment the heaps, and a long run grew
    from 2.8 to 4.0 GB over 20,000 images (benchmarks/results/rss_probe.json).  Trimming every
    few thousand images bounds that while keeping the fast path in between.
    """
    libc = _libc()
    if libc is not None:
        try:
            libc.malloc_trim(0)
        except AttributeError:  # not glibc
            pass


def keep_freed_memory() -> None:
    """Keep freed activation buffers in the heap instead of returning them to the OS.

    glibc mmaps every block above its threshold and unmaps it on free, so each
    layer of each batch page-faults its output in again; on the 2-core dev box
    that costs ~30% of the CPU forward pass (208 -> 292 img/s, AlexNet bf16 b64).
    """
    libc = _libc()
    if libc is None:
        return
    try:
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD
    except AttributeError:  # not glibc
        pass
