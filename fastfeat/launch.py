"""``--devices``: one ``fastfeat extract`` worker process per GPU, all writing one output directory.

Worker i runs the same command with ``--num-shards K --shard-index i --device cuda:0`` and sees only its
own GPU (``CUDA_VISIBLE_DEVICES``): Triton launches on the *current* device, and a process that sees one
GPU cannot launch on another one by mistake, nor open a context on GPU 0 from every worker. The parts
take disjoint output shards and merge them into one manifest under a file lock (fastfeat.output), so
together they equal a single-process run.

Each worker also gets an equal share of this process's CPUs as its decoder threads (``--threads``, unless
given): DALI's default of one thread per core in every worker would oversubscribe the CPUs K times and
preallocate per-thread nvJPEG device buffers and pinned host buffers K times over.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading

from .errors import ConfigError


def parse_devices(devices: str) -> list[int]:
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise ConfigError("--devices needs CUDA GPUs; use --num-shards/--shard-index to split work on CPU")
    if devices == "auto":
        return list(range(available))
    try:
        ids = [int(d) for d in devices.split(",") if d.strip()]
    except ValueError:
        raise ConfigError(f"--devices must be 'auto' or a list like 0,1, got {devices!r}") from None
    bad = [d for d in ids if not 0 <= d < available]
    if not ids or bad or len(set(ids)) != len(ids):
        raise ConfigError(f"--devices {devices!r}: choose distinct GPUs among 0..{available - 1}")
    return ids


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which a container or taskset may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _given(argv: list[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in argv)


def worker_argv(argv: list[str], index: int, count: int, cpus: int | None = None) -> list[str]:
    """The worker's command line: argv without --devices/--device/--num-shards/--shard-index, plus its
    part, ``--device cuda:0`` (its only visible GPU, see ``worker_env``) and its share of the CPUs."""
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
    extra = ["--num-shards", str(count), "--shard-index", str(index), "--device", "cuda:0"]
    if not _given(argv, "--threads"):
        extra += ["--threads", str(max(1, (cpus or available_cpus()) // count))]
    if index > 0:
        extra.append("--no-progress")  # one progress bar is readable, several interleaved are not
    return [sys.executable, "-m", "fastfeat", *out, *extra]


def worker_env(device: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: this one with ``CUDA_VISIBLE_DEVICES`` narrowed to GPU ``device``.

    ``device`` counts the GPUs this process sees; when CUDA_VISIBLE_DEVICES already narrows them (to
    "2,3", or to UUIDs), GPU 1 is its second entry, not the machine's GPU 1.
    """
    env = dict(os.environ if env is None else env)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",") if e.strip()] if visible is not None else None
    if entries is not None and not 0 <= device < len(entries):
        raise ConfigError(f"GPU {device} is not among CUDA_VISIBLE_DEVICES={visible!r}")
    env["CUDA_VISIBLE_DEVICES"] = entries[device] if entries is not None else str(device)
    return env


def launch_per_device(devices: str, argv: list[str]) -> int:
    ids = parse_devices(devices)
    workers = [(f"worker {i} (GPU {d})", worker_argv(argv, i, len(ids)), worker_env(d)) for i, d in enumerate(ids)]
    return supervise(workers)


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def supervise(workers: list[tuple[str, list[str], dict[str, str] | None]], grace_s: float = 30.0) -> int:
    """Run ``(name, argv, env)`` worker processes to the end, as one command: the exit status of the whole.

    - SIGINT/SIGTERM to this process are forwarded to every live worker (a finished shard is kept, the
      current one redone on resume: the output's protocol), then the workers are awaited and
      the status is 128 + the signal.  Workers run in their own session (so their own process group), so a
      Ctrl-C at the terminal reaches them once, through here, not twice.
    - A worker that exits non-zero stops its siblings (SIGTERM; SIGKILL after ``grace_s`` seconds), one line
      names it on stderr, and its status (1 for a worker killed by a signal) is returned.
    """
    procs: list[subprocess.Popen] = []
    received: list[int] = []
    signalled: set[int] = set()  # pids the handler has forwarded a signal to

    def forward(signum, _frame) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)
                signalled.add(p.pid)

    # Installed before the first worker starts: a signal at any time reaches every worker started, and
    # once one has come no further worker is started.
    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    exits: queue.Queue[subprocess.Popen] = queue.Queue()
    names: dict[int, str] = {}
    try:
        for name, cmd, env in workers:
            if received:
                break
            # A session of its own (setsid, done in C: safe beside the waiter threads, unlike preexec_fn).
            p = subprocess.Popen(cmd, env=env, start_new_session=True)
            procs.append(p)
            if received and p.pid not in signalled:  # the signal came while it was being started
                p.send_signal(received[-1])
            names[p.pid] = name
            # One waiter per worker: the first to end is seen at once, whichever it is.
            threading.Thread(target=lambda p=p: (p.wait(), exits.put(p)), daemon=True).start()
        failed = None
        for _ in procs:
            p = exits.get()
            if p.returncode != 0 and failed is None and not received:
                failed = p
                _stop(procs, grace_s)
    except BaseException:  # a worker that could not be started: none is left running unsupervised
        _stop(procs, grace_s)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        return 128 + received[0]
    if failed is not None:
        code = failed.returncode
        how = f"exit status {code}" if code > 0 else f"signal {signal.Signals(-code).name}"
        print(f"fastfeat: {names[failed.pid]} failed ({how}); the other workers were stopped", file=sys.stderr)
        return code if code > 0 else 1
    return 0


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
