"""fastfeat plot: the embedding against scikit-learn's PCA, the image written, and the command line."""

from __future__ import annotations

import numpy as np
import pytest
from crop_classes import make_crop_classes
from PIL import Image

import fastfeat
from fastfeat.cli import main
from fastfeat.data import load
from fastfeat.plot import embed, plot_embedding

PER_CLASS = 8


@pytest.fixture(scope="module")
def feats(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("plot")
    make_crop_classes(str(root / "src"), photos, PER_CLASS, seed=2)
    out = str(root / "out")
    fastfeat.extract(str(root / "src"), out, model="caffenet", weights="random:0", layers=["relu7"], progress=False)
    return out


def test_pca_embedding_equals_sklearns(feats):
    from sklearn.decomposition import PCA

    _, _, x = load(feats, "relu7", dtype="float32")
    got = embed(x, "pca", seed=0)
    want = PCA(2, svd_solver="full").fit_transform(x.astype(np.float64))
    for k in range(2):  # a principal axis is defined up to its sign
        sign = np.sign(got[:, k] @ want[:, k])
        np.testing.assert_allclose(sign * got[:, k], want[:, k], rtol=0, atol=1e-3 * np.abs(want[:, k]).max())


def test_tsne_keeps_classes_apart(feats):
    """Each point's nearest neighbour in the t-SNE map mostly shares its label (the map is not noise)."""
    _, labels, x = load(feats, "relu7", dtype="float32")
    xy = embed(x, "tsne", seed=0)
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    same = np.mean([labels[i] == labels[j] for i, j in enumerate(d.argmin(1))])
    assert same > 3 / 7, same  # chance is 1/7


def _sampled_rows(n_rows: int, points: int, seed: int) -> np.ndarray:
    """The rows plot_embedding samples (its documented draw)."""
    return np.sort(np.random.default_rng(seed).choice(n_rows, points, replace=False))


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_plot_writes_a_png(feats, tmp_path, method):
    out = tmp_path / f"{method}.png"
    drawn = plot_embedding(feats, "relu7", str(out), method=method, max_points=40)
    labels = drawn.pop("axis_labels")
    assert drawn == {"out": str(out), "points": 40, "rows": 7 * PER_CLASS, "classes": 7, "method": method,
                     "layer": "relu7"}  # fmt: skip
    if method == "pca":  # PC1/PC2 with the share of variance each explains, as sklearn's PCA computes it
        from sklearn.decomposition import PCA

        _, _, x = load(feats, "relu7", dtype="float32", rows=_sampled_rows(7 * PER_CLASS, 40, seed=0))
        ratio = PCA(2, svd_solver="full").fit(x.astype(np.float64)).explained_variance_ratio_
        assert labels == [f"PC{i + 1} ({ratio[i]:.1%} of variance)" for i in range(2)]
    else:
        assert labels is None
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 500
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert len(colours) > 20  # points in several colours, a legend and a title: not a blank canvas


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "umap"], "unknown --method 'umap'"),
        (["--max-points", "2"], "--max-points must be >= 3"),
        (["--layer", "fc6"], "has no layer fc6"),
        (["--out", "NOWHERE/x.png"], "folder of --out does not exist"),
        (["--out", "OUT.jpg"], "--out must end in .png, .pdf or .svg"),
    ],
)
def test_bad_arguments_one_line_exit_2_nothing_written(feats, tmp_path, capsys, extra, message):
    target = tmp_path / "x.png"
    extra = [e.replace("NOWHERE", str(tmp_path / "missing")).replace("OUT", str(tmp_path / "x")) for e in extra]
    argv = ["plot", feats, *(["--out", str(target)] if "--out" not in extra else []), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli(feats, tmp_path, capsys):
    out = tmp_path / "tsne.png"
    assert main(["plot", feats, "--layer", "relu7", "--out", str(out), "--max-points", "30"]) == 0
    assert out.is_file() and "tsne of 30 of 56 rows, 7 labels" in capsys.readouterr().out
