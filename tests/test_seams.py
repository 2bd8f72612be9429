"""The seams: output formats (sinks), backends and models are registries, and each registered
entry works end to end; kernels/ is a leaf; the runner knows no model and no format."""

from __future__ import annotations

import ast
import json
import os
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import column_matrix, cut_after_shards, fast_first, read_features

import fastfeat
from fastfeat.backends import backend_names, make_backend, unavailable_reason
from fastfeat.cli import main
from fastfeat.layers import LAYER_KINDS
from fastfeat.models import get_model, list_models
from fastfeat.output import verify
from fastfeat.profile_report import TYPE_ORDER
from fastfeat.sinks import format_names
from fastfeat.weights import load_weights

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = {"model": "alexnet", "weights": "random:3", "layers": ["pool5", "relu7"], "batch_size": 3, "shard_size": 4}


def test_registries_list_every_builtin_entry():
    assert {"torch", "triton", "compile"} <= set(backend_names())
    assert {"parquet", "npy"} <= set(format_names())
    assert {"caffenet", "alexnet"} <= set(list_models())
    assert set(TYPE_ORDER) == set(LAYER_KINDS)  # the profile summarises every kind


@pytest.mark.parametrize("name", fast_first(list_models(), keep=2))
def test_every_model_matches_its_stored_figures(name):
    spec = get_model(name)
    assert spec.expected_macs is not None and spec.total_macs() == spec.expected_macs
    shapes = spec.shapes()
    assert spec.expected_shapes and all(shapes[k] == tuple(v) for k, v in spec.expected_shapes.items())
    # Weights: every key's shape derives from the layer list, and the random weights fit them.
    tensors = load_weights(spec, "random:0").tensors
    assert {k: tuple(v.shape) for k, v in tensors.items()} == spec.param_shapes()


def test_kernels_is_a_leaf_package():
    """kernels/ imports nothing of fastfeat but its own modules (it is installed as fastfeat.kernels)."""
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            bad = [m for m in mods if m.split(".")[0] == "fastfeat" and not m.startswith("fastfeat.kernels")]
            assert not bad, f"{path.name} imports {bad}"


def test_runner_knows_no_model_backend_or_format():
    tree = ast.parse((ROOT / "fastfeat" / "runner.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported.isdisjoint({"models", "backends", "sinks.parquet", "sinks.npy", "output", "decode", "pyarrow"})


def test_unknown_backend_and_format_are_one_line_errors(dataset, tmp_path, capsys):
    for flag, value in (("--backend", "tensorrt"), ("--format", "lance")):
        out = tmp_path / value
        code = main(["extract", dataset, "--out", str(out), "--weights", "random:0", flag, value, "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and value in err and not out.exists(), err


@pytest.fixture(scope="module")
def parquet_and_npy_runs(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    for fmt in ("parquet", "npy"):
        fastfeat.extract(dataset, str(root / fmt), format=fmt, progress=False, **RUN)
    return root / "parquet", root / "npy"


def test_npy_format_holds_the_same_rows_as_parquet(parquet_and_npy_runs):
    pq_out, npy_out = parquet_and_npy_runs
    table = read_features(str(pq_out))
    manifest = json.loads((npy_out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["config"]["format"] == "npy"
    ids, labels, layers = [], [], {name: [] for name in RUN["layers"]}
    for shard in manifest["shards"]:
        rows = pq.read_table(npy_out / shard["file"])
        assert shard["file"].endswith(".ids.parquet") and len(rows) == shard["rows"]
        ids += rows.column("id").to_pylist()
        labels += rows.column("label").to_pylist()
        assert sorted(f["file"] for f in shard["extra_files"]) == sorted(
            shard["file"].replace(".ids.parquet", f".{n}.npy") for n in RUN["layers"]
        )
        for name in RUN["layers"]:
            arr = np.load(npy_out / shard["file"].replace(".ids.parquet", f".{name}.npy"), mmap_mode="r")
            assert arr.dtype == np.float16 and arr.shape[0] == shard["rows"]
            layers[name].append(np.asarray(arr))
    assert ids == table.column("id").to_pylist() and labels == table.column("label").to_pylist()
    for name in RUN["layers"]:
        got = np.concatenate(layers[name])
        want = column_matrix(table, name)
        assert got.shape == want.shape and np.array_equal(got.view(np.uint16), want.view(np.uint16)), name
    assert json.loads(rows.schema.metadata[b"fastfeat"])["layers"] == {"pool5": [256, 6, 6], "relu7": [4096]}


def test_verify_checks_every_file_of_either_format(parquet_and_npy_runs, tmp_path, capsys):
    import shutil

    for out in parquet_and_npy_runs:
        assert verify(str(out)) == [] and main(["verify", str(out)]) == 0
        damaged = tmp_path / out.name
        shutil.copytree(out, damaged)
        victim = sorted(p for p in damaged.iterdir() if p.name.startswith("part-00001."))[-1]
        data = bytearray(victim.read_bytes())
        data[-40] ^= 0xFF  # one flipped byte anywhere in any file of a shard
        victim.write_bytes(bytes(data))
        problems = verify(str(damaged))
        assert any(victim.name in p and "checksum" in p for p in problems), problems
        assert main(["verify", str(damaged)]) == 1
        victim.unlink()
        assert f"{victim.name}: missing" in verify(str(damaged))
    capsys.readouterr()


def test_npy_run_resumes_after_a_lost_shard(parquet_and_npy_runs, dataset, tmp_path):
    import shutil

    _, npy_out = parquet_and_npy_runs
    out = tmp_path / "npy"
    shutil.copytree(npy_out, out)
    cut_after_shards(out, 1)
    summary = fastfeat.extract(dataset, str(out), format="npy", progress=False, **RUN)
    assert summary["skipped_already_done"] == 4 and summary["complete"]
    for f in npy_out.glob("part-*"):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.slow
def test_extract_with_the_compile_backend_equals_torch(dataset, tmp_path):
    if (why := unavailable_reason("compile", torch.device("cpu"))) is not None:
        pytest.skip(why)
    run = {**RUN, "layers": ["relu7"], "shard_size": 100, "batch_size": 8, "precision": "fp32"}
    compiled = fastfeat.extract(dataset, str(tmp_path / "compile"), backend="compile", progress=False, **run)
    eager = fastfeat.extract(dataset, str(tmp_path / "torch"), backend="torch", progress=False, **run)
    assert compiled["backend"] == "compile" and compiled["rows_written"] == eager["rows_written"] > 8
    got, want = read_features(str(tmp_path / "compile")), read_features(str(tmp_path / "torch"))
    assert got.column("id").to_pylist() == want.column("id").to_pylist()
    a, b = column_matrix(got, "relu7").astype(np.float64), column_matrix(want, "relu7").astype(np.float64)
    # fp32 compute, float16 storage: Inductor may fuse and reorder sums (measured 0 difference on CPU),
    # so allow a few float16 ulps (2^-11 relative) of the stored values.
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-3
    meta = json.loads(pq.read_schema(os.path.join(tmp_path / "compile", "part-00000.parquet")).metadata[b"fastfeat"])
    assert meta["backend"] == "compile"


@pytest.mark.slow
def test_every_backend_runs_every_requested_layer(tmp_path):
    """Each backend available here returns exactly the requested layers with the spec's shapes."""
    spec = get_model("caffenet")
    tensors = load_weights(spec, "random:1").tensors
    taps = ["conv1", "norm1", "fc7", "relu7"]
    x = torch.randn(1, spec.input_size, spec.input_size, 3)
    for name in backend_names():
        if name == "compile" or unavailable_reason(name, torch.device("cpu")) is not None:
            continue  # compile: covered end to end above, and it recompiles for minutes per layer set
        net = make_backend(name, spec, tensors, torch.device("cpu"), torch.float32)
        out = net.forward_intermediates(net.prepare(x), taps)
        assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {t: spec.shapes()[t] for t in taps}, name
