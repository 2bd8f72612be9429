"""``fastfeat plot``: a 2-D embedding of a sample of an output directory's features, one colour per
label, as DeCAF's Figure 1 (t-SNE of DeCAF1/DeCAF6 on ILSVRC validation images).

The sample is ``max_points`` rows drawn uniformly without replacement (seeded), read through
``fastfeat.data``.  t-SNE (scikit-learn) runs on the first 50 principal components, as is usual for
4096-d features (it denoises and makes the neighbour search tractable); ``pca`` plots the first two
components.  Colours: tab10/tab20 for up to 20 classes, then a sampled continuous map, whose
legend lists at most ``LEGEND_MAX`` classes, the largest first.
"""

from __future__ import annotations

import os

import numpy as np

from .data import DataError, Shards, class_index, label_codes, load
from .errors import FastfeatError

METHODS = ("tsne", "pca")
LEGEND_MAX = 30
PCA_DIMS_BEFORE_TSNE = 50


class PlotError(FastfeatError):
    """A bad argument or an unusable output directory: one line, exit code 2, nothing written."""


def check_output(out: str) -> None:
    """Fail before the work: the image must be a .png/.pdf/.svg in an existing folder."""
    if not out.lower().endswith((".png", ".pdf", ".svg")):
        raise PlotError(f"--out must end in .png, .pdf or .svg, got {out!r}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise PlotError(f"folder of --out does not exist: {folder}")


def _pca(x: np.ndarray, k: int) -> np.ndarray:
    return pca_with_variance(x, k)[0]


def pca_with_variance(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """([n, k] coordinates on the first k principal axes, [k] share of the total variance of each)."""
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)  # the sample is small: an exact SVD is cheap
    variance = s.astype(np.float64) ** 2
    return u[:, :k] * s[:k], variance[:k] / max(variance.sum(), np.finfo(np.float64).tiny)


def embed(x: np.ndarray, method: str, seed: int) -> np.ndarray:
    """[n, 2] coordinates of the rows of ``x``."""
    if method == "pca":
        return _pca(x, 2)
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise PlotError(
            "--method tsne needs scikit-learn: pip install 'fastfeat[plot]' (or use --method pca)"
        ) from None
    reduced = _pca(x, min(PCA_DIMS_BEFORE_TSNE, *x.shape))
    perplexity = min(30.0, (len(x) - 1) / 3)  # scikit-learn requires perplexity < n
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)


def plot_embedding(
    path: str, layer: str, out: str, method: str = "tsne", max_points: int = 2000, seed: int = 0
) -> dict:
    """Draw the embedding into ``out``; returns what was drawn (points, classes, method)."""
    if method not in METHODS:
        raise PlotError(f"unknown --method {method!r}; choose tsne or pca")
    if max_points < 3:
        raise PlotError(f"--max-points must be >= 3, got {max_points}")
    check_output(out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("fastfeat plot needs matplotlib: pip install 'fastfeat[plot]'") from None
    try:
        shards = Shards(path)
        (layer,) = shards.check_layers(layer)
    except DataError as exc:
        raise PlotError(str(exc)) from None
    if shards.num_rows < 3:
        raise PlotError(f"{path} has {shards.num_rows} rows; a plot needs at least 3")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(shards.num_rows, min(max_points, shards.num_rows), replace=False))
    _, labels, x = load(path, layer, dtype="float32", rows=rows)
    classes = class_index(path, shards.manifest)
    import pyarrow as pa

    codes = label_codes(pa.array(labels, pa.string()), classes)
    axis_labels = None
    if method == "pca":
        xy, share = pca_with_variance(x, 2)
        axis_labels = [f"PC{i + 1} ({share[i]:.1%} of variance)" for i in range(2)]
    else:
        xy = embed(x, method, seed)

    present, counts = np.unique(codes, return_counts=True)
    order = present[np.argsort(-counts, kind="stable")]  # largest class first in the legend
    n_colours = len(classes)
    cmap = plt.get_cmap("tab10" if n_colours <= 10 else "tab20" if n_colours <= 20 else "gist_ncar")
    fig, ax = plt.subplots(figsize=(8, 7), dpi=120)
    for rank, k in enumerate(order):
        mask = codes == k
        if k < 0:
            colour, name = (0.6, 0.6, 0.6, 0.6), "(no label)"
        else:
            colour = cmap(k % cmap.N if n_colours <= 20 else k / max(n_colours - 1, 1))
            name = classes[k]
        ax.scatter(xy[mask, 0], xy[mask, 1], s=14, color=colour, alpha=0.8, linewidths=0,
                   label=f"{name} ({mask.sum()})" if rank < LEGEND_MAX else None)  # fmt: skip
    meta = shards.metadata
    weights = meta.get("weights", {})
    source = "random weights" if weights.get("random") else os.path.basename(str(weights.get("source", "")))
    views = (meta.get("augment") or {}).get("views", "center")
    ax.set_title(
        f"{method.upper() if method == 'pca' else 't-SNE'} of {layer} ({meta.get('model')}, {source}, {views}), "
        f"{len(rows)} of {shards.num_rows} rows",
        fontsize=10,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    if axis_labels is not None:  # t-SNE's axes have no meaning to name; PCA's are the principal axes
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
    extra = len(order) - LEGEND_MAX
    ax.legend(
        loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False, markerscale=1.5,
        title=f"label (+{extra} more)" if extra > 0 else "label",
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return {"out": out, "points": len(rows), "rows": shards.num_rows, "classes": int((present >= 0).sum()),
            "method": method, "layer": layer, "axis_labels": axis_labels}  # fmt: skip


__all__ = ["METHODS", "PlotError", "check_output", "embed", "pca_with_variance", "plot_embedding"]
