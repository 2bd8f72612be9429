"""The triton backend end to end: same layers, names and shapes as the torch backend, same features.

On a CPU-only machine this runs in Triton's interpreter (tests/triton_interpreter.py sets
TRITON_INTERPRET=1 and makes its bf16 dot and casts exact), on real photos at batch 2.
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import read_features
from reference import reference_preprocess, rel_err

import fastfeat
from fastfeat.backends import make_backend
from fastfeat.kernels import backend_available
from fastfeat.models import get_model
from fastfeat.weights import load_weights

# ‖triton − torch‖ / ‖torch‖ on the same input, both in the given precision.  fp32: both exact up to
# summation order (measured 1.5e-6); fp16/bf16: two independent roundings of every layer
# (measured 7e-4 fp16; bf16 about 8x that).
TOLERANCES = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
TAPS = ["conv1", "norm1", "pool5", "relu6", "fc7", "relu7", "fc8"]

pytestmark = pytest.mark.skipif(not backend_available()[0], reason=backend_available()[1])


@pytest.mark.parametrize(
    "model,dtype",
    [("caffenet", torch.float32), ("alexnet", torch.float32), ("caffenet", torch.bfloat16), ("alexnet", torch.float16)],
)
def test_triton_matches_torch_backend(model, dtype, photos):
    spec = get_model(model)
    weights = load_weights(spec, "random:7")
    taps = [t for t in TAPS if t in spec.layer_names]
    x = torch.cat([reference_preprocess(p, model) for p in photos[:2]])
    tri = make_backend("triton", spec, weights.tensors, torch.device("cpu"), dtype)
    ref = make_backend("torch", spec, weights.tensors, torch.device("cpu"), dtype)
    got = tri.forward_intermediates(tri.prepare(x), taps)
    want = ref.forward_intermediates(ref.prepare(x), taps)
    shapes = spec.shapes()
    for name in taps:
        assert got[name].shape == want[name].shape == (2, *shapes[name]), name
        # Flattened as the pipeline stores them (C×H×W for conv-side layers).
        err = rel_err(got[name].reshape(2, -1).float(), want[name].reshape(2, -1).float())
        assert err < TOLERANCES[dtype], (model, dtype, name, err)


def test_plan_fuses_but_never_hides_a_requested_layer():
    spec = get_model("caffenet")
    net = make_backend("triton", spec, load_weights(spec, "random:0").tensors, torch.device("cpu"), torch.float32)
    full = [op.name for op in net.plan(["relu7"])]
    assert full == [
        "conv1+relu1", "pool1+norm1", "conv2+relu2", "pool2+norm2", "conv3+relu3", "conv4+relu4",
        "conv5+relu5", "pool5", "fc6+relu6", "fc7+relu7",
    ]  # fmt: skip
    tapped = [op.name for op in net.plan(["conv1", "pool1", "fc7"])]
    assert tapped[:3] == ["conv1", "relu1+pool1", "norm1"] and tapped[-1] == "fc7"
    covered = [n for op in net.plan(["fc8"]) for n in op.covers]
    assert covered == spec.layer_names


def test_cli_triton_backend_end_to_end(dataset, tmp_path):
    pytest.importorskip("nvidia.dali", reason="the GPU check machine has no DALI")
    env = {**os.environ, "TRITON_INTERPRET": "1"} if not torch.cuda.is_available() else dict(os.environ)
    src = tmp_path / "src"
    src.mkdir()
    for name in sorted(os.listdir(os.path.join(dataset, "cat")))[:2]:
        os.link(os.path.join(dataset, "cat", name), src / name)
    kw = ["--model", "alexnet", "--weights", "random:2", "--layers", "pool5,relu7", "--precision", "fp32"]
    cmd = [sys.executable, "-m", "fastfeat", "extract", str(src), *kw, "--no-progress"]
    subprocess.run([*cmd, "--out", str(tmp_path / "tri"), "--backend", "triton"], check=True, env=env, timeout=600)
    fastfeat.extract(str(src), str(tmp_path / "torch"), model="alexnet", weights="random:2", layers="pool5,relu7",
                     precision="fp32", progress=False)  # fmt: skip
    a, b = read_features(str(tmp_path / "tri")), read_features(str(tmp_path / "torch"))
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    import json

    assert json.loads(a.schema.metadata[b"fastfeat"])["backend"] == "triton"
    for layer in ("pool5", "relu7"):
        x = torch.tensor(a.column(layer).combine_chunks().flatten().to_numpy(zero_copy_only=False).astype("float32"))
        y = torch.tensor(b.column(layer).combine_chunks().flatten().to_numpy(zero_copy_only=False).astype("float32"))
        assert rel_err(x, y) < 2e-3  # both stored as float16


def test_triton_without_cuda_or_interpreter_is_a_clear_error(dataset, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the backend is available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastfeat", "extract", dataset, "--out", str(tmp_path / "o"), "--weights", "random:0"]
    proc = subprocess.run([*cmd, "--backend", "triton"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "needs a CUDA GPU or TRITON_INTERPRET=1" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
