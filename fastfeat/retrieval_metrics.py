"""Retrieval scores: average precision with junk ignored, revisited Easy/Medium/Hard, N-S score.

:func:`average_precision` and :func:`mean_average_precision` follow ``compute_ap`` and
``compute_map`` of revisitop (Radenović et al. 2018, github.com/filipradenovic/revisitop,
``python/evaluate.py``): the zero-based positions of the positives in the ranked list are lowered
by the number of junk images ranked before each (junk is removed from the list), then AP is the
area under the precision-recall curve by trapezoids.  That is the same AP as the Oxford
Buildings ``compute_ap.cpp`` (junk skipped) and as INRIA Holidays' ``eval_holidays.py``
(``score_ap_from_ranks_1``).  A query with no positive is left out of the mean (its AP is NaN),
as revisitop does; mP@k is the precision at min(k, position of the last positive), as there.
"""

from __future__ import annotations

import numpy as np

KAPPAS = (1, 5, 10)  # revisitop's mP@k


def average_precision(positions: np.ndarray, positives: int) -> float:
    """AP from the sorted zero-based ranks of the retrieved positives (junk already removed)."""
    if positives < 1:
        raise ValueError("average_precision needs at least one positive")
    ap = 0.0
    for j, rank in enumerate(np.asarray(positions, dtype=np.int64)):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_at = (j + 1) / (rank + 1)
        ap += (precision_before + precision_at) / (2.0 * positives)
    return ap


def positive_positions(ranking: np.ndarray, ok, junk=()) -> np.ndarray:
    """Sorted zero-based positions of ``ok`` items in ``ranking``, with junk ranked before each removed."""
    ranking = np.asarray(ranking)
    pos = np.flatnonzero(np.isin(ranking, np.asarray(list(ok), dtype=ranking.dtype)))
    junk_at = np.flatnonzero(np.isin(ranking, np.asarray(list(junk), dtype=ranking.dtype)))
    return pos - np.searchsorted(junk_at, pos)  # junk before each positive


def query_scores(ranking: np.ndarray, ok, junk=(), kappas=KAPPAS) -> tuple[float, list[float]]:
    """(AP, [precision@k]) of one query; (NaN, [NaN...]) when it has no positive."""
    ok = list(ok)
    if not ok:
        return float("nan"), [float("nan")] * len(kappas)
    pos = positive_positions(ranking, ok, junk)
    ap = average_precision(pos, len(ok))
    one_based = pos + 1
    precisions = []
    for k in kappas:
        # revisitop: min(max(pos), k); a query none of whose positives was ranked has max() of nothing
        kq = min(int(one_based.max()), k) if len(one_based) else k
        precisions.append(float((one_based <= kq).sum() / kq))
    return ap, precisions


def mean_average_precision(rankings: list[np.ndarray], gnd: list[dict], kappas=KAPPAS) -> dict:
    """revisitop's compute_map: ``gnd[i]`` has ``ok`` and optionally ``junk``; ``rankings[i]`` is query i's list."""
    aps, prs = [], []
    for ranking, g in zip(rankings, gnd, strict=True):
        ap, pr = query_scores(ranking, g["ok"], g.get("junk", ()), kappas)
        aps.append(ap)
        prs.append(pr)
    aps_arr, prs_arr = np.array(aps, dtype=np.float64), np.array(prs, dtype=np.float64).reshape(len(aps), len(kappas))
    scored = ~np.isnan(aps_arr)
    if not scored.any():
        raise ValueError("no query has a positive: nothing to score")
    return {
        "mAP": float(aps_arr[scored].mean()),
        "mP@k": {str(k): float(prs_arr[scored, j].mean()) for j, k in enumerate(kappas)},
        "queries": len(aps),
        "queries_without_positive": int((~scored).sum()),
        "ap": [None if np.isnan(a) else float(a) for a in aps_arr],
    }


def revisited_protocols(gnd: list[dict]) -> dict[str, list[dict]]:
    """revisitop's three set-ups from the easy/hard/junk lists of each query (``example_evaluate.py``)."""

    def cat(g, *keys):
        return [i for k in keys for i in g.get(k, [])]

    return {
        "easy": [{"ok": cat(g, "easy"), "junk": cat(g, "junk", "hard")} for g in gnd],
        "medium": [{"ok": cat(g, "easy", "hard"), "junk": cat(g, "junk")} for g in gnd],
        "hard": [{"ok": cat(g, "hard"), "junk": cat(g, "junk", "easy")} for g in gnd],
    }


def ns_score(rankings: list[np.ndarray], groups: list[set]) -> float:
    """UKBench's N-S score: the mean number of the query's group (itself included, 4 images) in its top 4."""
    if not rankings:
        raise ValueError("ns_score needs at least one query")
    return float(np.mean([len(set(np.asarray(r)[:4].tolist()) & g) for r, g in zip(rankings, groups, strict=True)]))


__all__ = [
    "KAPPAS", "average_precision", "mean_average_precision", "ns_score", "positive_positions", "query_scores",
    "revisited_protocols",
]  # fmt: skip
