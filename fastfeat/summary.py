"""What a run tells its user: the progress bar while it runs, and the summary at the end
(``summary.json`` keeps every figure; the terminal gets a short readable block)."""

from __future__ import annotations

import os
import sys
import time

from . import storage
from .caveats import random_weights_note
from .version import __version__

# When the command started (fastfeat.cli.main sets it from the process's start time), so that wall
# time counts the interpreter's start and the imports; None in a library call, where the process
# (a notebook, a test run) started long before the run and its age says nothing about the run.
command_started_at: float | None = None


def mark_command_start() -> None:
    """Called first thing by the command line: the process's start (Linux /proc), else now."""
    global command_started_at
    command_started_at = process_started_at() or time.time()


ERRORS_FILE = "errors.parquet"  # fastfeat.output.ERRORS

# The runner's stage keys (summary.json's "stage_busy_s") in plain words.
STAGE_WORDS = {
    "read": "reading files",
    "decode": "decoding (DALI)",
    "h2d": "the copy to the device",
    "forward": "the forward pass",
    "d2h": "the copy from the device",
    "write": "writing shards",
}


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


class ProgressBar:
    """tqdm bar over the images of the shards to do; ``update(images, errors)`` after each written batch.

    The running error count shows after the rate ("3 errors") once there is one."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.errors = 0
        self.text = ""
        self._bar = tqdm(
            total=total, unit="img", desc="extract", file=sys.stderr, dynamic_ncols=True, smoothing=0.1
        )  # fmt: skip

    def update(self, images: int, errors: int = 0) -> None:
        if errors:  # only batches with errors touch the postfix; update() below redraws (rate-limited)
            self.errors += errors
            self._bar.set_postfix_str(self._postfix(), refresh=False)
        self._bar.update(images)

    def status(self, text: str) -> None:
        """A run's state after the rate (a Ray run: "shards 3/10, workers 2"), before the error count."""
        self.text = text
        self._bar.set_postfix_str(self._postfix(), refresh=False)

    def _postfix(self) -> str:
        return ", ".join(p for p in (self.text, _plural(self.errors, "error") if self.errors else "") if p)

    def close(self) -> None:
        self._bar.close()


def run_summary(
    ex, stats, processed: int, done_items: int, complete: bool, git_sha: str | None, startup_s: float | None = None
) -> dict:
    """Every figure of a run, for summary.json (``ex`` is the Extractor, ``stats`` the runner's RunStats).

    ``startup_s`` is the time before the runner started (arguments, model and weights load, decoder
    build): ``wall_s`` and ``images_per_s`` leave it out, ``images_per_s_with_startup`` counts it.
    """
    wall = stats.wall_s
    total = wall + startup_s if startup_s is not None else None
    since_start = None if command_started_at is None else time.time() - command_started_at
    return {
        "images": len(ex.items),
        "part": f"{ex.shard_index}/{ex.num_shards}",
        "processed": processed,
        "skipped_already_done": done_items,
        "rows_written": stats.rows,
        "errors": stats.errors,
        "warnings": getattr(stats, "warnings", 0),
        "wall_s": round(wall, 3),
        "images_per_s": round(processed / wall, 2) if wall > 0 else None,
        "startup_s": round(startup_s, 3) if startup_s is not None else None,
        "images_per_s_with_startup": round(processed / total, 2) if total else None,
        # From the command's process start (interpreter and imports included) to the first batch handed
        # to its shard writer, and to this summary: the wall time a user waits. None in a library call.
        "time_to_first_batch_s": _since_command_start(getattr(stats, "first_batch_at", None)),
        "process_wall_s": round(since_start, 3) if since_start is not None else None,
        "stage_busy_s": {k: round(v, 3) for k, v in stats.busy.items()},
        "thread_wait_s": {k: round(v, 3) for k, v in stats.wait.items()},
        "complete": complete,
        "out": storage.display(ex.out),
        "model": ex.spec.name,
        "backend": ex.backend_name,
        "format": ex.format,
        "device": str(ex.device),
        "precision": ex.precision,
        "batch_size": ex.batch_size,
        "weights": (getattr(ex, "weights_id", None) or {}).get("source"),
        "fastfeat_version": __version__,
        "git_sha": git_sha,
    }


def process_started_at() -> float | None:
    """When this process started, as a ``time.time()`` epoch (Linux: /proc), or None.

    The start-up a user waits through begins there, before Python imports torch and DALI."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def _since_command_start(moment: float | None) -> float | None:
    started = command_started_at
    return round(moment - started, 3) if moment is not None and started is not None else None


def _rate(images: int, seconds: float) -> str:
    return f"{seconds:.2f} s, {images / seconds:,.1f} img/s" if seconds > 0 and images else f"{seconds:.2f} s"


def _bottleneck(summary: dict) -> str | None:
    busy = {k: v for k, v in summary.get("stage_busy_s", {}).items() if v > 0}
    wall = summary.get("wall_s") or 0
    if not busy or wall <= 0:
        return None
    stage = max(busy, key=busy.get)
    share = min(busy[stage] / (wall * summary.get("workers", 1)), 1.0)  # a Ray run sums busy time over workers
    return f"{STAGE_WORDS.get(stage, stage)} (busy {share:.0%} of the time)"


def format_summary(summary: dict) -> str:
    """The end-of-run block for the terminal: a few labelled lines, no jargon."""
    processed, errors, warnings = summary["processed"], summary["errors"], summary.get("warnings", 0)
    done = summary.get("skipped_already_done", 0)
    lines = [
        ("images processed", f"{processed:,}" + (f" ({done:,} more were done by an earlier run)" if done else "")),
        ("rows written", f"{summary['rows_written']:,}"),
    ]
    problems = []
    if errors:
        problems.append(f"{_plural(errors, 'image')} skipped")
    if warnings:
        problems.append(f"{_plural(warnings, 'image')} kept with a warning")
    where = os.path.join(summary["out"], ERRORS_FILE)
    lines.append(("errors", f"{', '.join(problems)}; listed in {where}" if problems else "0"))
    # Each figure names what it covers: the pipeline alone, the start-up before it, and the time from
    # the process's start, which includes both and the imports before them.
    lines.append(("time", f"{_rate(processed, summary['wall_s'])} (the pipeline: read, decode, forward, write)"))
    if (startup := summary.get("startup_s")) is not None:
        lines.append(("start-up", f"{startup:.2f} s before the pipeline (model load, decoder build)"))
    if (first := summary.get("time_to_first_batch_s")) is not None:
        lines.append(("first batch", f"{first:.2f} s after the process started (imports included)"))
    if (whole := summary.get("process_wall_s")) is not None:
        lines.append(("wall time", f"{_rate(processed, whole)} since the process started (all of the above)"))
    if (ray := summary.get("ray")) is not None:
        gpus = f" + {ray['gpus_per_worker']:g} GPU" if ray.get("gpus_per_worker") else ""
        retried = f", {_plural(ray['retried_shards'], 'shard')} retried" if ray.get("retried_shards") else ""
        lines.append(("ray", f"{_plural(ray['workers'], 'worker')} × {ray['cpus_per_worker']:g} CPU{gpus}{retried}"))
    if processed and (bottleneck := _bottleneck(summary)) is not None:
        lines.append(("bottleneck", bottleneck))
    if (note := random_weights_note(summary.get("weights"))) is not None:
        lines.append(("warning", note))
    out = summary["out"]
    if not summary.get("complete", True):
        out += " (this part is done; other parts still to run)"
    lines.append(("output", out))
    width = max(len(label) for label, _ in lines) + 1
    return "\n".join(f"{label + ':':<{width}} {text}" for label, text in lines)
