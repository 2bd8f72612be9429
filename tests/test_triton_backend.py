"""The triton backend end to end: same layers, names and shapes as the torch backend, same features.

On a GPU both backends run there (the torch backend on cuDNN/cuBLAS with TF32 off for fp32), whole
network to fc8, caffenet and alexnet in fp32 and bf16, plus VGG-16 fp32 and AlexNet fp16.  On a
CPU-only machine this runs in Triton's interpreter (tests/triton_interpreter.py sets TRITON_INTERPRET=1
and makes its bf16 dot and casts exact), on real photos at batch 2 (batch 1 and a downscaled input for
the networks listed in INTERPRETER_INPUT).  Where the sample photos are not installed (the GPU check's
machine has torch, triton and torchvision only) the inputs are seeded N(0,1) images instead.
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from helpers import read_features
from reference import reference_preprocess, rel_err

import fastfeat
from fastfeat.backends import make_backend
from fastfeat.kernels import backend_available, interpreter_active
from fastfeat.models import get_model, list_models
from fastfeat.weights import load_weights

# ‖triton − torch‖ / ‖torch‖ on the same input, both in the given precision.  fp32: both exact up to
# summation order (measured 1.5e-6); fp16/bf16: two independent roundings of every layer
# (measured 7e-4 fp16; bf16 about 8x that).
TOLERANCES = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Each model compares the ones it has.  VGG-16's conv1_2 / relu5_3 taps leave conv1_2 unfused (then
# relu1_2+pool1 runs in the pool kernel) and conv5_3+relu5_3 fused ahead of a plain 2x2 pool5.
TAPS = ["conv1", "norm1", "conv1_2", "pool3", "relu5_3", "pool5", "pool6", "relu6", "fc7", "relu7", "fc8"]
# Under the interpreter only: (batch, input size) of networks too slow for it at full size.  VGG-16
# at 224 takes ~60 s for batch 1 up to pool2 alone (conv1_2 ~45 s of it); at 64×64 the whole network
# runs in ~40 s: every layer's channels and kernel geometry, only the spatial extent shrinks; pool5 is
# still 2×2 (so fc6's NHWC column permutation is exercised), fc6 reads 512·2·2 features instead of
# 512·7·7, with random weights drawn for the downscaled spec.
INTERPRETER_INPUT = {"vgg16": (1, 64)}
# Two of the seed papers' other networks at full width (CNN-M: LRN over 96 and 256 channels, stride-2 padded
# conv2; OverFeat accurate: 1024-channel convs, 3/3 pools): 1.7 and 5.4 GMACs at full size, so under the
# interpreter at an input that keeps pool5 (pool6) 2×2, and marked slow (~3.5 min each on the 2-core box).
# All six run at reduced width in tests/test_seed_networks.py.
SEED_NETWORK_INPUT = {"cnn-m": 99, "overfeat-accurate": 113}
SEED_NETWORKS_ELSEWHERE = {"cnn-f", "cnn-m-2048", "cnn-s", "overfeat-fast"}
INTERPRETER_INPUT.update({name: (1, size) for name, size in SEED_NETWORK_INPUT.items()})

# Pairs the interpreter skips: AlexNet bf16 adds ~40 s there and its kernels are covered by CaffeNet bf16
# and AlexNet fp16; on a GPU every pair runs.
GPU_ONLY = {("alexnet", torch.bfloat16)}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(not backend_available()[0], reason=backend_available()[1])


@pytest.fixture
def photos_or_none(request):
    """The sample photos, or None where they are not installed (then the test uses random images)."""
    try:
        return request.getfixturevalue("photos")
    except pytest.skip.Exception:
        return None


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,dtype",
    [
        pytest.param(name, torch.float32, marks=[pytest.mark.slow] if name in SEED_NETWORK_INPUT else [])
        for name in list_models()
        if name not in SEED_NETWORKS_ELSEWHERE
    ]
    + [("caffenet", torch.bfloat16), ("alexnet", torch.bfloat16), ("alexnet", torch.float16)],
    ids=lambda v: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else None,
)
def test_triton_matches_torch_backend(model, dtype, photos_or_none):
    if interpreter_active() and (model, dtype) in GPU_ONLY:
        pytest.skip("GPU only: too slow for the interpreter, and its kernels are covered by the other pairs there")
    spec = get_model(model)
    batch, size = 2, spec.input_size
    if interpreter_active() and model in INTERPRETER_INPUT:
        batch, size = INTERPRETER_INPUT[model]
        spec = dataclasses.replace(spec, input_size=size)
    weights = load_weights(spec, "random:7")
    taps = [t for t in TAPS if t in spec.layer_names]
    if photos_or_none is not None:
        x = torch.cat([reference_preprocess(p, model) for p in photos_or_none[:batch]])
    else:
        x = torch.randn(batch, spec.input_size, spec.input_size, 3, generator=torch.Generator().manual_seed(7))
    if size != x.shape[1]:  # downscaled photos: area-average the preprocessed crop
        x = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), size=(size, size), mode="area")
        x = x.permute(0, 2, 3, 1).contiguous()
    tri = make_backend("triton", spec, weights.tensors, DEVICE, dtype)
    ref = make_backend("torch", spec, weights.tensors, DEVICE, dtype)
    got = tri.forward_intermediates(tri.prepare(x), taps)
    want = ref.forward_intermediates(ref.prepare(x), taps)
    shapes = spec.shapes()
    for name in taps:
        assert got[name].shape == want[name].shape == (batch, *shapes[name]), name
        # Flattened as the pipeline stores them (C×H×W for conv-side layers).
        err = rel_err(got[name].reshape(batch, -1).float().cpu(), want[name].reshape(batch, -1).float().cpu())
        assert err < TOLERANCES[dtype], (model, dtype, name, err)


def test_plan_fuses_but_never_hides_a_requested_layer():
    spec = get_model("caffenet")
    # DEVICE: on a GPU machine the CPU needs TRITON_INTERPRET=1, which only CPU-only runs set (found by gpu_check).
    net = make_backend("triton", spec, load_weights(spec, "random:0").tensors, DEVICE, torch.float32)
    full = [op.name for op in net.plan(["relu7"])]
    assert full == [
        "conv1+relu1", "pool1+norm1", "conv2+relu2", "pool2+norm2", "conv3+relu3", "conv4+relu4",
        "conv5+relu5", "pool5", "fc6+relu6", "fc7+relu7",
    ]  # fmt: skip
    tapped = [op.name for op in net.plan(["conv1", "pool1", "fc7"])]
    assert tapped[:3] == ["conv1", "relu1+pool1", "norm1"] and tapped[-1] == "fc7"
    covered = [n for op in net.plan(["fc8"]) for n in op.covers]
    assert covered == spec.layer_names


@pytest.mark.slow
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


@pytest.mark.slow
def test_triton_without_cuda_or_interpreter_is_a_clear_error(dataset, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the backend is available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastfeat", "extract", dataset, "--out", str(tmp_path / "o"), "--weights", "random:0"]
    proc = subprocess.run([*cmd, "--backend", "triton"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "needs a CUDA GPU or TRITON_INTERPRET=1" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # the backend's switch; the kernel itself is in the fast loop (tests/kernels/test_conv_s2d.py)
@pytest.mark.parametrize("model", ["caffenet", "alexnet"])
def test_conv1_space_to_depth_variant(model, monkeypatch):
    """FASTFEAT_CONV_S2D=1: conv1 runs as the 3x3 tap-loop conv over a space-to-depth input (weights
    rearranged once at construction) and matches the torch backend; later convs keep the direct path."""
    monkeypatch.setenv("FASTFEAT_CONV_S2D", "1")
    spec = get_model(model)
    weights = load_weights(spec, "random:7")
    x = torch.randn(1, spec.input_size, spec.input_size, 3, generator=torch.Generator().manual_seed(5))
    tri = make_backend("triton", spec, weights.tensors, DEVICE, torch.float32)
    assert tri.s2d_layers == {"conv1"}
    ref = make_backend("torch", spec, weights.tensors, DEVICE, torch.float32)
    got = tri.forward_intermediates(tri.prepare(x), ["conv1"])["conv1"]
    want = ref.forward_intermediates(ref.prepare(x), ["conv1"])["conv1"]
    assert got.shape == want.shape
    assert rel_err(got.reshape(1, -1).float().cpu(), want.reshape(1, -1).float().cpu()) < TOLERANCES[torch.float32]


@pytest.mark.slow  # the backend's switch; the kernel itself is in the fast loop (tests/kernels/test_conv_splitk.py)
def test_conv_split_k_variant(monkeypatch):
    """FASTFEAT_CONV_SPLITK=1: CaffeNet's conv3 (13x13, 2304 of K) is planned as the tap-segmented conv
    (kernels/conv_splitk.py) and matches F.conv2d at batch 1, where it splits; conv1 does not segment."""
    from fastfeat.kernels import conv as conv_module

    monkeypatch.setenv("FASTFEAT_CONV_SPLITK", "1")
    spec = get_model("caffenet")
    weights = load_weights(spec, "random:7")
    tri = make_backend("triton", spec, weights.tensors, DEVICE, torch.float32)
    assert tri.conv_k_split
    planned = []
    real = conv_module.segmented_run
    monkeypatch.setattr(conv_module, "segmented_run", lambda *a, **k: planned.append(k) or real(*a, **k))
    steps = {step.layer.name: step for step in tri._fuse(["conv3"])}
    c, h, w = spec.input_shapes()["conv3"]
    x = torch.randn(1, h, w, c, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    tri._launch(steps["conv1"], (1, spec.input_size, spec.input_size, 3), DEVICE)
    assert planned == []
    run, shape = tri._launch(steps["conv3"], tuple(x.shape), DEVICE)
    assert [(p["segments"], p["taps_per_segment"]) for p in planned] == [(3, 3)]
    got = run(x)
    key = steps["conv3"].layer.param_key
    weight, bias = weights.tensors[f"{key}.weight"].to(DEVICE), weights.tensors[f"{key}.bias"].to(DEVICE)
    want = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=1).permute(0, 2, 3, 1)
    want = torch.relu(want) if steps["conv3"].relu else want
    assert tuple(got.shape) == shape == tuple(want.shape)
    assert rel_err(got.reshape(1, -1).float().cpu(), want.reshape(1, -1).float().cpu()) < TOLERANCES[torch.float32]
