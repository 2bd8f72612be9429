"""How the probe prepares feature rows before a linear fit; shared by both engines (numpy or torch).

``l2_normalize_rows`` (``--l2-normalize``) scales each row to unit length.  ``standardize`` is always
applied after it, with statistics from the rows being fitted: subtract their mean row, then divide by
one scalar, the root of their mean squared (centred) norm, so the fitted rows have mean squared norm 1.

Why: raw relu7 rows are all non-negative with norms of ~10³ (squared ~10⁷), so the unpenalised bias
and the mean direction are nearly collinear and a quasi-Newton solver crawls (the issue's 40 s per
split that still stopped at its iteration limit).  Centring removes that collinearity; one common
scale (not a per-unit one) keeps the features' geometry, so ``C`` means the same whatever the
features' scale.  For logistic regression (bias not penalised) this changes no prediction of the
exact optimum: ``W (x − μ)/s + b`` is ``W' x + b'`` with ``W' = W/s`` and ``b' = b − W μ/s``.
"""

from __future__ import annotations

import contextlib

# A fit over at most this many feature values (rows × dim) runs its BLAS/torch on one thread: at that
# size threads gain nothing, and on a loaded machine OpenBLAS's spinning threads made a 28-row logreg
# 40x slower (20 s against 0.5 s for one fit, load average 17 on 2 cores).
ONE_THREAD_ELEMENTS = 1 << 22

STANDARDIZE = "centre on the fitted rows' mean, divide by the root of their mean squared centred norm"


def l2_normalize_rows(x):
    """Each row to unit L2 norm (an all-zero row stays zero); numpy or torch."""
    norms = (x * x).sum(1, keepdims=True) ** 0.5
    return x / (norms + (norms == 0))


def scale_from(mean_square_norm: float, mean_row_square_norm: float) -> float:
    """The divisor s: root of the mean squared norm after centring, E‖x‖² − ‖μ‖² (1 for constant rows)."""
    centred = mean_square_norm - mean_row_square_norm
    return max(centred, 0.0) ** 0.5 or 1.0


@contextlib.contextmanager
def threads_for(elements: int):
    """One BLAS and torch thread for a fit over ``elements`` ≤ ONE_THREAD_ELEMENTS values, else as set."""
    if elements > ONE_THREAD_ELEMENTS:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)
