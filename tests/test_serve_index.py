"""Nearest neighbours over extract outputs (fastfeat.serve.index): both formats, exact and HNSW search,
reading in chunks across shards, and refusing a directory of other features."""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest

import fastfeat
from fastfeat.errors import ConfigError
from fastfeat.serve import index as index_module
from fastfeat.serve.index import load_index, read_manifest


@pytest.fixture(scope="module")
def outputs(dataset, tmp_path_factory):
    """The same 7 images extracted twice, as .npy and as Parquet shards of 3 rows (float16, as stored by default)."""
    root = tmp_path_factory.mktemp("index")
    source = root / "src"
    ids = sorted((os.path.relpath(os.path.join(d, f), dataset) for d, _, fs in os.walk(dataset) for f in fs))[:7]
    for i in ids:
        (source / os.path.dirname(i)).mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(dataset, i), source / i)
    outs = {}
    for fmt in ("npy", "parquet"):
        outs[fmt] = str(root / fmt)
        fastfeat.extract(str(source), outs[fmt], model="caffenet", weights="random:3", layers=["relu6", "relu7"],
                         batch_size=3, shard_size=3, device="cpu", precision="fp32", format=fmt, progress=False)  # fmt: skip
    return outs, str(source)


def _served(path: str) -> dict:
    return read_manifest(path)["config"]["metadata"]


def _rows(path: str, layer: str) -> tuple[list[str], np.ndarray]:
    ids, rows = [], []
    for i, _, values in index_module._chunks(path, read_manifest(path), layer):
        ids += i
        rows.append(values)
    return ids, np.concatenate(rows)


def test_both_formats_read_the_same_rows_in_chunks(outputs, monkeypatch):
    outs, _ = outputs
    monkeypatch.setattr(index_module, "CHUNK_ROWS", 2)  # chunks that straddle the 3-row shards
    npy_ids, npy_rows = _rows(outs["npy"], "relu7")
    pq_ids, pq_rows = _rows(outs["parquet"], "relu7")
    assert npy_ids == pq_ids and len(npy_ids) == 7 and npy_rows.dtype == np.float32
    assert np.array_equal(npy_rows, pq_rows)


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_every_row_finds_itself(outputs, fmt):
    outs, _ = outputs
    index = load_index(outs[fmt], _served(outs[fmt]), None, exact_below=1000)
    assert index.exact and index.layer == "relu7" and len(index) == 7  # the deepest layer held
    ids, rows = _rows(outs[fmt], "relu7")
    hits = index.search(rows, k=3)
    for i, found in zip(ids, hits, strict=True):
        assert i in [h["id"] for h in found if h["score"] > 0.9999]
        assert [h["score"] for h in found] == sorted((h["score"] for h in found), reverse=True)
    # Cosine: the scale of a query does not matter.
    assert index.search(rows[:1] * 7.5, k=1)[0][0]["score"] == pytest.approx(hits[0][0]["score"], abs=1e-6)
    assert len(index.search(rows[:1], k=50)[0]) == 7  # k above the row count: every row once


def test_hnsw_above_the_threshold_agrees_with_exact(outputs):
    outs, _ = outputs
    exact = load_index(outs["npy"], _served(outs["npy"]), "relu6", exact_below=1000)
    approx = load_index(outs["npy"], _served(outs["npy"]), "relu6", exact_below=5)
    assert not approx.exact and approx.kind.startswith("approximate") and exact.kind.startswith("exact")
    _, rows = _rows(outs["npy"], "relu6")
    for a, b in zip(exact.search(rows, 4), approx.search(rows, 4), strict=True):
        # 7 rows: HNSW's graph reaches every one. The same set, in the same order up to ties (two rows within
        # 1e-5 may swap: faiss builds the graph with several threads, so its visiting order varies).
        assert {h["id"] for h in a} == {h["id"] for h in b}
        assert [h["id"] for h in a] == [h["id"] for h in b] or any(
            abs(x["score"] - y["score"]) <= 1e-5 for x, y in zip(a, a[1:], strict=False)
        )
        assert [h["score"] for h in a] == pytest.approx([h["score"] for h in b], abs=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(model="alexnet"), "holds caffenet features; the server runs alexnet"),
        (lambda m: m["weights"].update(sha256="0" * 64, source="other.pth"), "other weights"),
        (lambda m: m["preprocessing"].update(mean_sha256="ab" * 32), "preprocessing mean_sha256"),
    ],
    ids=["model", "weights", "mean"],
)
def test_other_features_are_refused(outputs, change, message):
    outs, _ = outputs
    served = copy.deepcopy(_served(outs["npy"]))
    change(served)
    with pytest.raises(ConfigError, match=message):
        load_index(outs["npy"], served, None, exact_below=1000)


def test_layer_not_held_is_refused(outputs):
    outs, _ = outputs
    served = copy.deepcopy(_served(outs["npy"]))
    served["layers"] = {"pool5": [256, 6, 6]}
    with pytest.raises(ConfigError, match="none in common"):
        load_index(outs["npy"], served, None, exact_below=1000)
    with pytest.raises(ConfigError, match="not pool5"):
        load_index(outs["npy"], _served(outs["npy"]), "pool5", exact_below=1000)


def test_precision_may_differ(outputs):
    outs, _ = outputs
    served = copy.deepcopy(_served(outs["npy"]))
    served.update(precision="bf16", backend="compile", device="cuda")
    assert len(load_index(outs["npy"], served, None, exact_below=1000)) == 7


def test_missing_shard_file_is_one_line(outputs, tmp_path):
    outs, _ = outputs
    broken = str(tmp_path / "broken")
    shutil.copytree(outs["npy"], broken)
    os.unlink(os.path.join(broken, "part-00001.relu7.npy"))
    with pytest.raises(ConfigError, match="cannot read shard part-00001"):
        load_index(broken, _served(broken), None, exact_below=1000)


def test_thumbnail_items_come_from_the_source(outputs, tmp_path):
    outs, source = outputs
    index = load_index(outs["parquet"], _served(outs["parquet"]), None, exact_below=1000)
    first = index.ids[0]
    assert index.thumbnails_available() and index.item(first).path == os.path.join(source, first)
    assert index.item("not/indexed.jpg") is None
    moved = str(tmp_path / "moved")
    shutil.copytree(outs["parquet"], moved)
    manifest = read_manifest(moved)
    manifest["source"] = str(tmp_path / "gone")  # extracted from a folder that no longer exists
    with open(os.path.join(moved, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    other = load_index(moved, _served(moved), None, exact_below=1000)
    assert not other.thumbnails_available() and other.item(first) is None and other.describe()["thumbnails"] is False


def test_an_index_of_augmented_features_is_refused(outputs, tmp_path):
    """An index made with --augment 10crop holds means over 10 views; the server answers with centre
    crops: refused with the reason and the fix (one line, exit 2 from the command line)."""
    outs, _ = outputs
    augmented = str(tmp_path / "tencrop")
    shutil.copytree(outs["npy"], augmented)
    manifest_file = os.path.join(augmented, "manifest.json")
    manifest = json.load(open(manifest_file))
    manifest["config"]["metadata"]["augment"] = {"views": "10crop", "crops": ["center"] * 10, "reduce": "mean"}
    with open(manifest_file, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ConfigError, match=r"extracted with --augment 10crop; the server computes centre-crop .* again"):
        load_index(augmented, _served(outs["npy"]), None, exact_below=1000)
    assert load_index(outs["npy"], _served(outs["npy"]), None, exact_below=1000)  # centre crops: accepted
