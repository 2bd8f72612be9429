"""fastfeat.data: the shards as a torch IterableDataset, against pyarrow/numpy reads of the manifest's files.

The output directories are made by real `fastfeat extract` runs (in a subprocess, so no DALI thread
is alive when DataLoader workers fork), with tiny shards and tiny Parquet row groups so that a few
dozen rows make many units that divide unevenly over ranks and workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from crop_classes import make_crop_classes

import fastfeat.data as data
from fastfeat.data import DataError, FeatureDataset, class_index, load, load_labels, parquet_files

PER_CLASS = 6
# Parquet row groups of at most 3 rows' worth of relu7 float16 (the writer flushes once it holds that much).
SMALL_ROW_GROUP = 3 * 4096 * 2
EXTRACT = """
import sys
import fastfeat.sinks.parquet as parquet
parquet.ROW_GROUP_BYTES = int(sys.argv[1])
from fastfeat.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _extract(source, out, *args):
    cmd = [sys.executable, "-c", EXTRACT, str(SMALL_ROW_GROUP), "extract", str(source), "--out", str(out)]
    cmd += ["--model", "caffenet", "--weights", "random:0", "--layers", "relu7", "--no-progress", *args]
    subprocess.run(cmd, check=True, capture_output=True)
    return str(out)


@pytest.fixture(scope="module")
def source(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("crops")
    make_crop_classes(str(root), photos, PER_CLASS)
    return root


@pytest.fixture(scope="module")
def parquet_out(tmp_path_factory, source):
    return _extract(source, tmp_path_factory.mktemp("pq") / "out", "--shard-size", "10", "--batch-size", "2")


@pytest.fixture(scope="module")
def npy_out(tmp_path_factory, source):
    return _extract(source, tmp_path_factory.mktemp("npy") / "out", "--shard-size", "7", "--format", "npy")


def _manifest(out):
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def _reference(out):
    """ids, labels and relu7 of every listed shard in order, read with plain pyarrow / numpy."""
    m = _manifest(out)
    ids, labels, feats = [], [], []
    for rec in m["shards"]:
        table = pq.read_table(os.path.join(out, rec["file"]))
        ids += table.column("id").to_pylist()
        labels += table.column("label").to_pylist()
        if m["config"]["format"] == "npy":
            feats.append(np.load(os.path.join(out, rec["file"].replace(".ids.parquet", ".relu7.npy"))))
        else:
            feats.append(np.array(table.column("relu7").to_pylist(), np.float16))
    return ids, labels, np.concatenate(feats)


def _rows(batches):
    return torch.cat([b["row"] for b in batches]).numpy()


@pytest.mark.slow
def test_fixture_has_many_uneven_units(parquet_out, npy_out, monkeypatch):
    pq_units = FeatureDataset(parquet_out).shards.units
    assert len(pq_units) >= 10 and len({u.rows for u in pq_units}) > 1  # row groups of 4 and 2 rows
    monkeypatch.setattr(data, "ROW_GROUP_BYTES", SMALL_ROW_GROUP)
    assert len(FeatureDataset(npy_out).shards.units) > 6


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_load_equals_a_plain_read_of_the_manifest(fmt, parquet_out, npy_out):
    out = parquet_out if fmt == "parquet" else npy_out
    ids, labels, x = load(out, "relu7")
    want_ids, want_labels, want_x = _reference(out)
    assert ids == want_ids and labels == want_labels and len(ids) == PER_CLASS * 7
    assert x.dtype == np.float16 and np.array_equal(x, want_x)
    assert np.abs(want_x.astype(np.float32)).sum() > 0  # real activations, not zeros
    _, _, x32 = load(out, "relu7", dtype="float32")
    assert x32.dtype == np.float32 and np.array_equal(x32, want_x.astype(np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_batches_are_contiguous_tensors_with_the_stored_rows(fmt, parquet_out, npy_out, monkeypatch):
    monkeypatch.setattr(data, "ROW_GROUP_BYTES", SMALL_ROW_GROUP)
    out = parquet_out if fmt == "parquet" else npy_out
    ids, labels, x = load(out, "relu7")
    classes = class_index(out)
    ds = FeatureDataset(out, "relu7", batch_size=5, ids=True)
    batches = list(ds)
    assert [len(b["row"]) for b in batches] == [5] * 8 + [2]  # batches span units; the last one is short
    got = torch.cat([b["relu7"] for b in batches])
    assert got.dtype == torch.float16 and all(b["relu7"].is_contiguous() for b in batches)
    assert np.array_equal(got.numpy(), x)
    assert [i for b in batches for i in b["id"]] == ids
    assert torch.cat([b["label"] for b in batches]).tolist() == [classes.index(lab) for lab in labels]
    as_f32 = torch.cat([b["relu7"] for b in FeatureDataset(out, "relu7", batch_size=7, dtype="float32")])
    assert as_f32.dtype == torch.float32 and torch.equal(as_f32, torch.from_numpy(x).float())
    assert len(list(FeatureDataset(out, "relu7", batch_size=5, drop_last=True))) == 8


@pytest.mark.slow
def test_each_row_once_over_ranks_and_workers(parquet_out):
    """2 DataLoader workers × a simulated world size of 3: every row exactly once, with its own features."""
    _, _, x = load(parquet_out, "relu7")
    seen, per_rank = [], []
    for rank in range(3):
        ds = FeatureDataset(parquet_out, "relu7", batch_size=3, shuffle=True, seed=5, rank=rank, world_size=3)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        batches = list(loader)
        for b in batches:
            assert np.array_equal(b["relu7"].numpy(), x[b["row"].numpy()])  # each row carries its own features
        per_rank.append(_rows(batches))
        seen.append(per_rank[-1])
    rows = np.concatenate(seen)
    assert len(rows) == len(x) and sorted(rows) == list(range(len(x)))
    assert all(len(r) for r in per_rank)  # 13 units over 6 consumers: every rank gets rows, not equally many


@pytest.mark.slow
def test_epochs_and_seeds_reorder_the_same_rows(parquet_out):
    ds = FeatureDataset(parquet_out, "relu7", batch_size=4, shuffle=True, seed=1, shuffle_buffer=8)
    epoch0 = _rows(list(ds))
    again = _rows(list(ds))
    ds.set_epoch(1)
    epoch1 = _rows(list(ds))
    other_seed = _rows(list(FeatureDataset(parquet_out, "relu7", batch_size=4, shuffle=True, seed=2)))
    n = FeatureDataset(parquet_out).num_rows
    assert np.array_equal(epoch0, again)  # deterministic
    for order in (epoch1, other_seed):
        assert not np.array_equal(order, epoch0) and sorted(order) == sorted(epoch0) == list(range(n))
    # Rows move within windows, not only whole units: some row leaves its unit's neighbourhood.
    assert not np.array_equal(np.sort(epoch0[:4]), epoch0[:4]) or not np.array_equal(np.sort(epoch1[:4]), epoch1[:4])


@pytest.mark.slow
def test_shuffle_windows_are_bounded(parquet_out):
    ds = FeatureDataset(parquet_out, "relu7", shuffle=True, shuffle_buffer=8)
    largest_unit = max(u.rows for u in ds.shards.units)
    windows = ds._windows(0, 1)
    sizes = [sum(u.rows for u, _ in w) for w in windows]
    assert sum(sizes) == ds.num_rows and max(sizes) < 8 + largest_unit


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_from_state_dict_yields_exactly_the_rest(parquet_out, shuffle):
    make = lambda: FeatureDataset(parquet_out, "relu7", batch_size=4, shuffle=shuffle, seed=3, shuffle_buffer=8)
    ds = make()
    ds.set_epoch(2)
    full = list(ds)
    it = iter(ds)
    head = [next(it) for _ in range(5)]
    state = ds.state_dict()
    assert state["rows"] == 20 and state["epoch"] == 2
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # a state survives JSON (a checkpoint file)
    rest = list(resumed)
    assert np.array_equal(_rows(head + rest), _rows(full))
    assert all(torch.equal(a["relu7"], b["relu7"]) for a, b in zip(head + rest, full, strict=True))
    assert _rows(list(resumed)).size == ds.num_rows  # the next epoch starts from the beginning again


@pytest.mark.slow
def test_resume_refuses_another_dataset_or_world(parquet_out):
    ds = FeatureDataset(parquet_out, "relu7", batch_size=4, shuffle=True)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    with pytest.raises(DataError, match="another dataset"):
        FeatureDataset(parquet_out, "relu7", batch_size=4, shuffle=True, shuffle_buffer=5).load_state_dict(state)
    other = FeatureDataset(parquet_out, "relu7", batch_size=4, shuffle=True, rank=1, world_size=2)
    other.load_state_dict(state)
    with pytest.raises(DataError, match="same world size"):
        next(iter(other))


@pytest.mark.slow
def test_stateful_dataloader_resumes_mid_epoch(parquet_out):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    make = lambda: sdl.StatefulDataLoader(
        FeatureDataset(parquet_out, "relu7", batch_size=3, shuffle=True, seed=9, shuffle_buffer=6),
        batch_size=None,
        num_workers=2,
    )
    full = _rows(list(make()))
    loader = make()
    it = iter(loader)
    head = [next(it) for _ in range(4)]
    state = loader.state_dict()
    del it
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert np.array_equal(_rows(head + rest), full)
    assert sorted(full) == list(range(len(full)))


@pytest.mark.slow
def test_only_manifest_shards_are_read(tmp_path, parquet_out):
    """A partial shard of a killed run (temp file, or a file not yet listed) is never read."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(parquet_out, out)
    shutil.copy(out / "part-00000.parquet", out / "part-00007.parquet")  # as if written, not yet listed
    shutil.copy(out / "part-00000.parquet", out / "part-00008.parquet.4242.tmp")
    assert load(str(out), "relu7")[0] == load(parquet_out, "relu7")[0]
    assert sorted(_rows(list(FeatureDataset(str(out), "relu7")))) == list(range(7 * PER_CLASS))
    assert parquet_files(str(out)) == [str(out / f"part-0000{k}.parquet") for k in range(5)]


@pytest.mark.slow
def test_class_index_is_stable_under_append(tmp_path, photos):
    src = tmp_path / "src"
    make_crop_classes(str(src), photos[1:3], 2)
    out = _extract(src, tmp_path / "out")
    first = class_index(out)
    assert first == sorted(first) and len(first) == 2
    make_crop_classes(str(src), photos[:1], 2)  # a new class that sorts first ("astronaut")
    _extract(src, out, "--append")
    classes, codes = load_labels(out)
    assert classes[:2] == first and len(classes) == 3 and classes[2] < classes[0]  # appended, not re-sorted
    _, labels, _ = load(out, "relu7")
    assert [classes[c] for c in codes] == labels


@pytest.mark.slow
def test_bad_arguments(parquet_out, tmp_path):
    with pytest.raises(DataError, match="no layer relu6; it holds relu7"):
        FeatureDataset(parquet_out, "relu6")
    with pytest.raises(DataError, match="no manifest.json"):
        load(str(tmp_path), "relu7")
    with pytest.raises(DataError, match="rank must be"):
        FeatureDataset(parquet_out, rank=3, world_size=3)
    with pytest.raises(DataError, match="unknown dtype"):
        FeatureDataset(parquet_out, dtype="int8")
    with pytest.raises(DataError, match="rows must be in"):
        load(parquet_out, "relu7", rows=[0, 10_000])


@pytest.mark.slow
def test_rows_subset(parquet_out):
    _, _, x = load(parquet_out, "relu7")
    rows = np.array([1, 2, 3, 17, 40, 41])
    _, _, sub = load(parquet_out, "relu7", rows=rows)
    assert np.array_equal(sub, x[rows])
    got = list(FeatureDataset(parquet_out, "relu7", rows=rows, batch_size=4))
    assert np.array_equal(_rows(got), rows) and np.array_equal(torch.cat([b["relu7"] for b in got]).numpy(), x[rows])


@pytest.mark.slow
def test_hugging_face_datasets_reads_the_shards(parquet_out, tmp_path):
    datasets = pytest.importorskip("datasets")
    ids, labels, x = load(parquet_out, "relu7")
    hf = datasets.load_dataset("parquet", data_files=parquet_files(parquet_out), split="train", cache_dir=str(tmp_path))
    assert hf["id"] == ids and hf["label"] == labels
    assert np.array_equal(np.asarray(hf.with_format("numpy")["relu7"], np.float16), x)
