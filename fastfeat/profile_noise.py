"""Whether ``fastfeat profile``'s timings can be trusted: a loaded machine, repeats that disagree, and
times that come in multiples of the scheduler's tick.

On a machine with another job on its cores, an op's thread is descheduled for whole scheduler ticks
(4 ms at HZ=250): small ops then read 4 or 8 ms where they take microseconds (the issue: relu6 8.0 ms
at batch 64 against 0.005 ms at batch 1), with no sign of it in a median.  Three independent signs,
each cheap and each a pure function of numbers (tests inject them): the 1-minute load average against
the cores, the spread of each op's repeats, and the timings' clustering on a tick.
"""

from __future__ import annotations

import os

import numpy as np

SPREAD_LIMIT = 0.5  # (p80 − p20) / median above this: the op's repeats disagree
SPREAD_FLOOR_MS = 0.05  # ops faster than this are dominated by the timer itself: not judged
TICKS_MS = (10.0, 4.0, 1.0)  # scheduler ticks at HZ = 100, 250, 1000; the largest that fits is named
TICK_TOLERANCE = 0.02  # within 2% of a tick of its multiple "sits on" it (4% of evenly spread times do)
TICK_SHARE = 0.6  # this share of the timings of ≥ 2 ticks sitting on multiples: quantised
TICK_MIN_SAMPLES = 8


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def spread(times_ms: list[float]) -> float:
    """(p80 − p20) / median of one op's repeats (0 for a single run or a zero median)."""
    p20, p50, p80 = np.percentile(np.asarray(times_ms, dtype=np.float64), [20, 50, 80])
    return float((p80 - p20) / p50) if p50 > 0 else 0.0


def tick_ms(all_times_ms: list[float]) -> float | None:
    """The scheduler tick the timings cluster on (see TICKS_MS), or None."""
    times = np.asarray(all_times_ms, dtype=np.float64)
    for tick in TICKS_MS:
        long = times[times >= 2 * tick]
        if len(long) < TICK_MIN_SAMPLES:
            continue
        off = np.abs(long / tick - np.round(long / tick))
        if np.mean(off <= TICK_TOLERANCE) >= TICK_SHARE:
            return tick
    return None


def timing_quality(op_times_ms: dict[str, list[float]], load: float | None, cores: int) -> dict:
    """What the JSON records and the table warns about: {"load_average", "cores", "loaded",
    "noisy_ops" (name -> spread), "tick_ms", "warnings" (lines)}."""
    noisy = {
        name: round(spread(times), 2)
        for name, times in op_times_ms.items()
        if len(times) > 1 and np.median(times) >= SPREAD_FLOOR_MS and spread(times) > SPREAD_LIMIT
    }
    tick = tick_ms([t for times in op_times_ms.values() for t in times])
    loaded = load is not None and load >= cores
    warnings = []
    if loaded:
        warnings.append(f"the machine is loaded: load average {load:.1f} on {cores} cores; times include waiting")
    if noisy:
        warnings.append(
            f"{len(noisy)} of {len(op_times_ms)} ops vary by more than {SPREAD_LIMIT:.0%} between repeats "
            "(marked ~): their medians are unreliable"
        )
    if tick is not None:
        warnings.append(f"times cluster on multiples of {tick:g} ms (scheduler ticks): small ops read a tick, not work")
    return {
        "load_average": None if load is None else round(load, 2),
        "cores": cores,
        "loaded": loaded,
        "noisy_ops": noisy,
        "tick_ms": tick,
        "warnings": warnings,
    }
