"""pytest-benchmark plumbing for benchmarks/: each benchmark's p20/p50/p80 (ms) goes into results.csv.

A test asks for the ``result_row`` fixture and fills in what the timing is of (kernel, provider,
shape, dtype, batch, device); once its benchmark has run, the row is appended with the
percentiles of pytest-benchmark's per-round timings.  ``--results-csv PATH`` writes elsewhere
(for trial runs that should not land in the shared results file).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from results import RESULTS, append, percentiles  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--results-csv",
        default=RESULTS,
        help="long-format CSV that benchmark rows are appended to (default benchmarks/results/results.csv)",
    )


@pytest.fixture
def result_row(request, benchmark):
    row: dict = {}
    yield row
    stats = benchmark.stats  # None when the benchmark did not run (--benchmark-disable, an earlier error)
    if stats is None or benchmark.has_error or not stats.stats.data:
        return
    # stats.data holds seconds per call, one value per round.
    p20, p50, p80 = percentiles([seconds * 1e3 for seconds in stats.stats.data])
    append(
        [{**row, "metric": "ms", "p20": round(p20, 4), "p50": round(p50, 4), "p80": round(p80, 4)}],
        request.config.getoption("--results-csv"),
    )
