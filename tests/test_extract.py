"""End to end: the CLI and the Python API, the Parquet output, bad inputs and bad arguments."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from helpers import column_matrix, cut_after_shards, read_features
from reference import reference_model, reference_preprocess, rel_err

import fastfeat
from fastfeat.cli import main
from fastfeat.models import get_model
from fastfeat.weights import load_weights

# Features of a whole run against the fp32 reference model on PIL/torchvision-preprocessed input:
# preprocessing differences (<1%) plus bf16 rounding (<0.6%), measured 0.6-1.2% per image.
END_TO_END_TOL = 0.03


@pytest.fixture(scope="module")
def cli_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    cmd = [sys.executable, "-m", "fastfeat", "extract", dataset, "--out", str(out), "--model", "alexnet"]
    cmd += ["--weights", "random:5", "--layers", "pool5,relu7", "--batch-size", "4", "--shard-size", "5"]
    cmd += ["--dtype", "float32", "--no-progress", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return str(out), json.loads(proc.stdout), proc.stderr


@pytest.mark.slow
def test_cli_writes_shards_manifest_and_summary(cli_run, dataset):
    out, summary, stderr = cli_run
    n_images = sum(len(f) for _, _, f in os.walk(dataset))
    assert summary["images"] == n_images and summary["rows_written"] == n_images and summary["errors"] == 0
    assert set(summary["stage_busy_s"]) == {"read", "decode", "h2d", "forward", "d2h", "write"}
    assert set(summary["thread_wait_s"]) == {"read", "decode", "forward", "write"}
    assert 0 < summary["stage_busy_s"]["forward"] < summary["wall_s"]
    assert "img/s" in stderr
    files = sorted(f for f in os.listdir(out) if f.startswith("part-"))
    assert files == [f"part-{i:05d}.parquet" for i in range(-(-n_images // 5))]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["complete"] and [s["file"] for s in manifest["shards"]] == files
    for s in manifest["shards"]:
        assert pq.ParquetFile(os.path.join(out, s["file"])).metadata.num_rows == s["rows"] <= 5
    assert json.load(open(os.path.join(out, "summary.json")))["rows_written"] == n_images
    assert len(pq.read_table(os.path.join(out, "errors.parquet"))) == 0


@pytest.mark.slow
def test_rows_ids_labels_sizes_and_metadata(cli_run, dataset):
    out, _, _ = cli_run
    t = read_features(out)
    ids = t.column("id").to_pylist()
    assert ids == sorted(ids, key=lambda s: s.encode()) and len(set(ids)) == len(ids)
    for i, label in zip(ids, t.column("label").to_pylist(), strict=True):
        assert label == (i.split("/")[0] if "/" in i else None)
    from PIL import Image

    for i, w, h in zip(ids, t.column("width").to_pylist(), t.column("height").to_pylist(), strict=True):
        assert Image.open(os.path.join(dataset, i)).size == (w, h)
    assert str(t.schema.field("pool5").type) == "fixed_size_list<element: float>[9216]"
    meta = json.loads(t.schema.metadata[b"fastfeat"])
    assert meta["model"] == "alexnet" and meta["weights"]["source"] == "random:5" and meta["weights"]["random"]
    assert meta["layers"] == {"pool5": [256, 6, 6], "relu7": [4096]}
    assert meta["precision"] in ("bf16", "fp32") and meta["backend"] == "torch"
    assert meta["fastfeat_version"] == fastfeat.__version__ and len(meta["weights"]["sha256"]) == 64


@pytest.mark.slow
def test_features_match_independent_reference(cli_run, dataset):
    out, _, _ = cli_run
    t = read_features(out)
    spec = get_model("alexnet")
    ref_net = reference_model("alexnet", load_weights(spec, "random:5").tensors)
    ids = t.column("id").to_pylist()
    x = torch.cat([reference_preprocess(os.path.join(dataset, i), "alexnet") for i in ids])
    with torch.no_grad():
        ref = ref_net(x.permute(0, 3, 1, 2).contiguous())
    for layer in ("pool5", "relu7"):
        got = torch.from_numpy(column_matrix(t, layer)).float()
        want = ref[layer].reshape(len(ids), -1)  # pool5 flattened in C×H×W order
        for row in range(len(ids)):
            assert rel_err(got[row], want[row]) < END_TO_END_TOL, (layer, ids[row])


@pytest.mark.slow
def test_parquet_readable_by_duckdb_and_polars(cli_run):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    out, _, _ = cli_run
    t = read_features(out)
    relu7 = column_matrix(t, "relu7")
    glob = os.path.join(out, "part-*.parquet")
    rows = duckdb.sql(f"select id, relu7 from read_parquet('{glob}') order by filename, file_row_number").fetchall()
    assert [r[0] for r in rows] == t.column("id").to_pylist()
    np.testing.assert_array_equal(np.array([r[1] for r in rows], np.float32), relu7)
    df = pl.read_parquet(glob)
    assert df["id"].to_list() == t.column("id").to_pylist()
    np.testing.assert_array_equal(np.stack(df["relu7"].to_numpy()).astype(np.float32), relu7)


def test_same_input_twice_gives_identical_features(dataset, tmp_path):
    kw = dict(model="caffenet", weights="random:1", layers="conv5,relu7", batch_size=8, progress=False)
    fastfeat.extract(dataset, str(tmp_path / "a"), **kw)
    fastfeat.extract(dataset, str(tmp_path / "b"), **kw)
    a, b = read_features(str(tmp_path / "a")), read_features(str(tmp_path / "b"))
    assert a.equals(b)
    assert a.schema.field("relu7").type.value_type == "halffloat"  # float16 is the default


def test_corrupt_files_are_recorded_and_skipped(corrupt_dataset, photos, tmp_path):
    # The "clean run" has a good photo in place of each bad file, so every batch has the same shape.
    clean = tmp_path / "clean_src"
    shutil.copytree(corrupt_dataset, clean)
    for bad in ("01_truncated.jpg", "03_text.jpg"):
        shutil.copy(next(p for p in photos if p.endswith(".jpg")), clean / bad)
    kw = dict(model="caffenet", weights="random:2", layers="relu7", batch_size=8, progress=False)
    s = fastfeat.extract(corrupt_dataset, str(tmp_path / "corrupt"), **kw)
    fastfeat.extract(str(clean), str(tmp_path / "clean"), **kw)
    assert s["errors"] == 2 and s["rows_written"] == 4
    errors = pq.read_table(str(tmp_path / "corrupt" / "errors.parquet")).to_pylist()
    assert [(e["id"], e["stage"]) for e in errors] == [("01_truncated.jpg", "decode"), ("03_text.jpg", "header")]
    assert all(e["message"] for e in errors)
    got, ref = read_features(str(tmp_path / "corrupt")), read_features(str(tmp_path / "clean"))
    ref = ref.filter(pc.is_in(ref.column("id"), value_set=got.column("id")))
    assert got.column("id").to_pylist() == ref.column("id").to_pylist()
    np.testing.assert_array_equal(column_matrix(got, "relu7"), column_matrix(ref, "relu7"))  # bit-identical


def test_list_file_with_labels(dataset, tmp_path):
    ids = sorted(os.path.relpath(os.path.join(d, f), dataset) for d, _, fs in os.walk(dataset) for f in fs)[:5]
    lst = tmp_path / "images.txt"
    lst.write_text("# id label\n" + "".join(f"{os.path.join(dataset, i)}\tclass{k}\n" for k, i in enumerate(ids)))
    fastfeat.extract(str(lst), str(tmp_path / "out"), model="caffenet", weights="random:0", progress=False)
    t = read_features(str(tmp_path / "out"))
    assert t.column("label").to_pylist() == [f"class{k}" for k in range(5)]
    assert t.column("id").to_pylist() == [os.path.join(dataset, i) for i in ids]  # list order, path as written


def test_resume_after_interruption_equals_clean_run(dataset, tmp_path):
    kw = dict(model="caffenet", weights="random:3", layers="relu6", batch_size=2, shard_size=3, progress=False)
    full = tmp_path / "full"
    fastfeat.extract(dataset, str(full), **kw)
    # Simulate a crash during shard 2: its file never got renamed, the manifest does not list it or later shards.
    part = tmp_path / "part"
    fastfeat.extract(dataset, str(part), **kw)
    cut_after_shards(part, 2)
    killed = subprocess.Popen(["true"])
    killed.wait()  # a process id that no longer runs: its temp file is an orphan
    (part / f"part-00002.parquet.{killed.pid}.tmp").write_bytes(b"half a shard")
    s = fastfeat.extract(dataset, str(part), **kw)
    assert s["skipped_already_done"] == 6 and s["complete"]
    assert not any(f.endswith(".tmp") for f in os.listdir(part))
    assert read_features(str(part)).equals(read_features(str(full)))


# -- bad arguments: one line on stderr, exit code 2, nothing written ---------------------------------
@pytest.fixture
def run_cli(capsys):
    def run(*args):
        code = main(["extract", *map(str, args), "--no-progress"])
        err = capsys.readouterr().err.strip()
        return code, err

    return run


def _bad_weights(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    return tmp_path / "garbage.pth"


def _alexnet_weights(tmp_path):
    torch.save(load_weights(get_model("alexnet"), "random:0").tensors, tmp_path / "alexnet.pth")
    return tmp_path / "alexnet.pth"


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("missing source", lambda d, t: ["/nonexistent/images", "--weights", "random:0"], "source does not exist"),
        ("empty source", lambda d, t: [t, "--weights", "random:0"], "source has no images"),
        ("unknown model", lambda d, t: [d, "--model", "vgg99", "--weights", "random:0"], "unknown model 'vgg99'"),
        ("unknown layer", lambda d, t: [d, "--layers", "relu6,fc9", "--weights", "random:0"], "unknown layer 'fc9'"),
        ("unreadable weights", lambda d, t: [d, "--weights", _bad_weights(t)], "cannot read weights"),
        ("mismatched weights", lambda d, t: [d, "--weights", _alexnet_weights(t)], "missing key 'conv1.weight'"),
        ("missing weights", lambda d, t: [d, "--weights", t / "nope.pth"], "weights file not found"),
    ],
)
def test_bad_arguments(run_cli, dataset, tmp_path, case, args, message):
    src = tmp_path / "empty"
    src.mkdir()
    out = tmp_path / "out"
    code, err = run_cli(*args(dataset, src), "--out", out)
    assert code == 2, case
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_output_dir_with_a_different_run_is_refused(run_cli, dataset, tmp_path):
    out = tmp_path / "out"
    assert run_cli(dataset, "--out", out, "--weights", "random:0", "--layers", "relu7")[0] == 0
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
    code, err = run_cli(dataset, "--out", out, "--weights", "random:0", "--layers", "relu6")
    assert code == 2 and "holds a different run" in err and "layers" in err
    assert {f: os.path.getmtime(out / f) for f in os.listdir(out)} == before
    # Same configuration again: everything is already done and nothing is rewritten.
    code, _ = run_cli(dataset, "--out", out, "--weights", "random:0", "--layers", "relu7")
    assert code == 0
    assert {f: os.path.getmtime(out / f) for f in os.listdir(out) if f.startswith("part-")} == {
        f: t for f, t in before.items() if f.startswith("part-")
    }


def test_foreign_output_dir_is_refused(run_cli, dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = run_cli(dataset, "--out", out, "--weights", "random:0")
    assert code == 2 and "holds no fastfeat run" in err
    assert os.listdir(out) == ["notes.txt"]
