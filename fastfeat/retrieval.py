"""``fastfeat eval retrieval``: mAP of an extract output on an image-retrieval benchmark.

Each query's feature is compared with every database row by cosine similarity, ranked exactly by a
faiss ``IndexFlatIP`` over L2-normalised rows (as ``fastfeat serve --index`` does below its HNSW
threshold), and the rankings are scored by :mod:`fastfeat.retrieval_metrics` against the ground
truth read by :mod:`fastfeat.retrieval_gt`.

Razavian et al. (2014)'s processing, in their order: ``l2`` (each row to unit length), then
``pca`` N components with ``whiten`` (each component divided by the square root of its variance),
both learned on another output (``pca_from``: the paper learns them on a different data set, so the
test set never fits its own transform; that output gets the same ``l2`` first), then L2 again
(the cosine).

**Query crops (Oxford/Paris, revisited).** The output holds one feature per file, so a query's
feature is either that of the **full image** (default: the query's row in the database output;
the classic protocol's "full query" variant, which Razavian's Table 7 numbers do not use), or that
of the **cropped query** (the protocol's): crop the queries with ``fastfeat eval crop-queries``
(the box of the ground truth, written as PNG, lossless, named by the query), extract that folder
with the same options, and pass it as ``queries``.
"""

from __future__ import annotations

import os

import numpy as np

from . import retrieval_gt
from .data import DataError, Shards, load
from .errors import FastfeatError
from .retrieval_gt import GroundTruthError, stem
from .retrieval_metrics import KAPPAS, mean_average_precision, ns_score, revisited_protocols


class RetrievalError(FastfeatError):
    """A bad argument or an output that does not fit the ground truth: one line, exit code 2."""


def _layer(path: str, layer: str | None) -> str:
    try:
        shards = Shards(path)
        if layer is None:
            if len(shards.layer_dims) != 1:
                raise RetrievalError(f"{path} holds layers {', '.join(shards.layer_dims)}: choose one with --layer")
            return next(iter(shards.layer_dims))
        shards.check_layers(layer)
    except DataError as exc:
        raise RetrievalError(str(exc)) from None
    return layer


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def learn_pca(x: np.ndarray, dims: int | None, whiten: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean, projection [dim, dims]): principal axes of ``x``, each divided by its std when ``whiten``."""
    n, d = x.shape
    top = min(n - 1, d)
    dims = top if dims is None else dims
    if not 1 <= dims <= top:
        raise RetrievalError(f"--pca {dims}: the --pca-from output supports 1 to {top} components ({n} rows of {d})")
    mean = x.mean(0, dtype=np.float64)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    proj = vt[:dims].T
    if whiten:
        std = s[:dims] / np.sqrt(n - 1)
        proj = proj / np.maximum(std, 1e-12 * max(std[0], 1e-30))
    return mean.astype(np.float32), proj.astype(np.float32)


def _rows_by_stem(ids: list[str], what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, id_ in enumerate(ids):
        s = stem(id_)
        if s in out:
            raise RetrievalError(f"{what} holds two images named {s} ({ids[out[s]]}, {id_}): names must be unique")
        out[s] = i
    return out


def evaluate(
    path: str, dataset: str, gt: str | None = None, layer: str | None = None, queries: str | None = None,
    l2: bool = False, pca: int | None = None, pca_from: str | None = None, whiten: bool = False,
) -> dict:  # fmt: skip
    """Score ``path`` on ``dataset``; returns the report (what ``--json`` writes)."""
    if (pca is not None or whiten) and not pca_from:
        raise RetrievalError("--pca and --whiten are learned on another output: give --pca-from DIR")
    if pca_from and pca is None and not whiten:
        raise RetrievalError("--pca-from needs --pca N or --whiten")
    if pca is not None and pca < 1:
        raise RetrievalError(f"--pca must be >= 1, got {pca}")
    layer = _layer(path, layer)
    ids, _, x = load(path, layer, dtype="float32")
    names = _rows_by_stem(ids, path)
    try:
        truth = retrieval_gt.read(dataset, gt, list(names))
    except GroundTruthError as exc:
        raise RetrievalError(str(exc)) from None
    db_names = list(names) if truth.database is None else truth.database
    missing = [n for n in db_names if n not in names]
    if missing:
        raise RetrievalError(
            f"{path} lacks {len(missing)} database image(s) of {dataset}, e.g. {', '.join(missing[:3])}"
        )
    q_ids, q_x, q_names = ids, x, names
    if queries:
        _layer(queries, layer)
        q_ids, _, q_x = load(queries, layer, dtype="float32")
        q_names = _rows_by_stem(q_ids, queries)
    absent = [q.name for q in truth.queries if q.name not in q_names]
    if absent:
        where = queries or path
        raise RetrievalError(f"{where} lacks {len(absent)} query image(s), e.g. {', '.join(absent[:3])}")
    db = x[[names[n] for n in db_names]]
    qx = q_x[[q_names[q.name] for q in truth.queries]]
    if l2:
        db, qx = _l2(db), _l2(qx)
    if pca_from:
        _layer(pca_from, layer)
        _, _, train = load(pca_from, layer, dtype="float32")
        if train.shape[1] != db.shape[1]:
            raise RetrievalError(f"--pca-from {pca_from}: {layer} has {train.shape[1]} values, not {db.shape[1]}")
        mean, proj = learn_pca(_l2(train) if l2 else train, pca, whiten)
        db, qx = (db - mean) @ proj, (qx - mean) @ proj
    ranked = rank(_l2(db), _l2(qx))
    rankings = [[db_names[i] for i in r] for r in ranked]
    report = {
        "dir": os.path.abspath(path), "dataset": dataset, "layer": layer, "gt": gt,
        "queries_from": os.path.abspath(queries) if queries else "database (full query images)",
        "processing": {"l2": l2, "pca": pca, "pca_from": os.path.abspath(pca_from) if pca_from else None, "whiten": whiten},  # fmt: skip
        "database": len(db_names), "queries": len(truth.queries),
    }  # fmt: skip
    if dataset == "ukbench":
        report["ns_score"] = ns_score([np.array(r) for r in rankings], [set(q.lists["ok"]) for q in truth.queries])
        return report
    if dataset in ("roxford5k", "rparis6k"):
        report["protocols"] = {}
        for setup, gnd in revisited_protocols([q.lists for q in truth.queries]).items():
            scores = mean_average_precision([np.array(r) for r in rankings], gnd, KAPPAS)
            report["protocols"][setup] = scores
        return report
    scores = mean_average_precision([np.array(r) for r in rankings], [q.lists for q in truth.queries], ())
    report.update({"mAP": scores["mAP"], "queries_without_positive": scores["queries_without_positive"], "ap": scores["ap"]})  # fmt: skip
    return report


def rank(db: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """[queries, db] row numbers of the database by decreasing inner product (exact: faiss IndexFlatIP)."""
    import faiss

    index = faiss.IndexFlatIP(db.shape[1])
    index.add(np.ascontiguousarray(db, dtype=np.float32))
    _, order = index.search(np.ascontiguousarray(queries, dtype=np.float32), db.shape[0])
    return order


def format_report(r: dict) -> str:
    head = f"{r['dir']}  {r['dataset']}  {r['layer']}  {r['queries']} queries, {r['database']} database images"
    p = r["processing"]
    steps = [s for s, on in (("L2", p["l2"]), (f"PCA {p['pca']}" if p["pca"] else "", p["pca_from"]), ("whitening", p["whiten"])) if on and s]  # fmt: skip
    lines = [head, f"queries: {r['queries_from']}; processing: {' -> '.join(steps + ['L2 (cosine)'])}"]
    if "ns_score" in r:
        lines.append(f"N-S score {r['ns_score']:.3f} (of 4)")
    elif "protocols" in r:
        for setup, s in r["protocols"].items():
            mp = "  ".join(f"mP@{k} {v:.2%}" for k, v in s["mP@k"].items())
            lines.append(f"{setup:>6}  mAP {s['mAP']:.2%}  {mp}")
    else:
        lines.append(f"mAP {r['mAP']:.2%}")
    return "\n".join(lines)


def crop_queries(dataset: str, gt: str, images: str, out: str) -> list[str]:
    """Write each query's ground-truth crop as ``out/<query>.png``; returns the files written."""
    from PIL import Image

    if dataset not in ("oxford5k", "paris6k", "roxford5k", "rparis6k"):
        raise RetrievalError(f"crop-queries: --dataset {dataset} has no query boxes (oxford5k, paris6k, roxford5k, rparis6k)")  # fmt: skip
    try:
        truth = retrieval_gt.read(dataset, gt, [])
    except GroundTruthError as exc:
        raise RetrievalError(str(exc)) from None
    sources = {}
    for q in truth.queries:
        found = [p for ext in (".jpg", ".jpeg", ".png", ".JPG") if os.path.isfile(p := os.path.join(images, q.name + ext))]  # fmt: skip
        if not found:
            raise RetrievalError(f"--images {images} holds no image {q.name}.jpg")
        if q.bbx is None:
            raise RetrievalError(f"--gt {gt}: query {q.name} has no crop box")
        sources[q.name] = found[0]
    os.makedirs(out, exist_ok=True)
    written = []
    for q in truth.queries:
        with Image.open(sources[q.name]) as img:
            x1, y1, x2, y2 = q.bbx
            box = (
                max(0, int(x1)),
                max(0, int(y1)),
                min(img.width, int(np.ceil(x2))),
                min(img.height, int(np.ceil(y2))),
            )
            if box[2] <= box[0] or box[3] <= box[1]:
                raise RetrievalError(f"query {q.name}: empty crop box {q.bbx} in a {img.width}x{img.height} image")
            file = os.path.join(out, q.name + ".png")
            img.convert("RGB").crop(box).save(file)
            written.append(file)
    return written


__all__ = ["RetrievalError", "crop_queries", "evaluate", "format_report", "learn_pca", "rank"]
