"""The torch backend against independent plain-PyTorch references, on real photos, per precision;
the compile backend against the torch backend."""

import pytest
import torch
from helpers import fast_first
from reference import reference_model, reference_preprocess, rel_err

from fastfeat.backends import make_backend, unavailable_reason
from fastfeat.models import get_model, list_models
from fastfeat.weights import load_weights

# ‖out − ref‖ / ‖ref‖ against the fp32 reference.  bf16 keeps 8 mantissa bits (2^-9 ≈ 0.2% per
# rounding, accumulated over 8 layers: measured 0.4-0.6%; over VGG-16's 16: 0.5-0.75%); fp16 keeps 11
# (measured 0.06-0.08%; VGG-16 0.06-0.1%).
TOLERANCES = {"fp32": 1e-5, "bf16": 1.5e-2, "fp16": 2e-3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Every name a reference returns is compared where the model has it.  relu5_3 right after conv5_3
# checks that a tapped pre-activation survives the in-place ReLU on the conv side as well.
CONV_TAPS = ["norm2", "pool1", "pool2", "pool3", "pool4", "conv5_3", "relu5_3", "pool5"]
TAPS = [*CONV_TAPS, "fc6", "relu6", "fc7", "relu7", "fc8"]
# Photos per batch: 4, or 2 for a network over 2 GMACs per image (VGG-16 is ~21x AlexNet) to keep
# the suite's time in check on a 2-core machine.
BIG_MODEL_MACS = 2e9


@pytest.fixture(scope="module", params=fast_first(list_models(), keep=2))
def model_case(request, photos):
    name = request.param
    spec = get_model(name)
    weights = load_weights(spec, "random:7")
    batch = 2 if spec.total_macs() > BIG_MODEL_MACS else 4
    x = torch.cat([reference_preprocess(p, name) for p in photos[:batch]])
    with torch.no_grad():
        ref = reference_model(name, weights.tensors)(x.permute(0, 3, 1, 2).contiguous())
    return spec, weights, x, ref


@pytest.mark.parametrize("precision", fast_first(["fp32", "bf16", "fp16"]))
def test_torch_backend_matches_reference(model_case, precision):
    spec, weights, x, ref = model_case
    taps = [t for t in TAPS if t in spec.layer_names and t in ref]
    net = make_backend("torch", spec, weights.tensors, torch.device("cpu"), DTYPES[precision])
    out = net.forward_intermediates(net.prepare(x), taps)
    assert set(out) == set(taps)
    for name in taps:
        assert out[name].shape == ref[name].shape
        assert torch.isfinite(out[name]).all()
        err = rel_err(out[name].float(), ref[name])
        assert err < TOLERANCES[precision], (spec.name, precision, name, err)


@pytest.mark.slow
def test_compile_backend_matches_torch_backend_on_vgg16(photos):
    """Inductor on VGG-16 (fp32, one photo): CPU compile with freezing: ~50 s cold, ~10 s with a warm Inductor cache, on 2 cores.

    AlexNet's compiled forward pass is covered end to end in test_seams; CaffeNet's is not compiled
    anywhere in the suite (~30 s more)."""
    if (why := unavailable_reason("compile", torch.device("cpu"))) is not None:
        pytest.skip(why)
    spec = get_model("vgg16")
    tensors = load_weights(spec, "random:7").tensors
    x = reference_preprocess(photos[0], spec.name)
    taps = ["relu5_3", "pool5", "fc7", "relu7", "fc8"]
    eager = make_backend("torch", spec, tensors, torch.device("cpu"), torch.float32)
    compiled = make_backend("compile", spec, tensors, torch.device("cpu"), torch.float32)
    want = eager.forward_intermediates(eager.prepare(x), taps)
    got = compiled.forward_intermediates(compiled.prepare(x), taps)
    assert set(got) == set(taps)
    for name in taps:
        assert got[name].shape == want[name].shape == (1, *spec.shapes()[name])
        # Both fp32; Inductor may fuse and reorder sums (measured 0 difference on CPU).
        err = rel_err(got[name].float(), want[name].float())
        assert err < TOLERANCES["fp32"], (name, err)


@pytest.mark.slow
@pytest.mark.parametrize("user_dir", [None, "mine"])
def test_compile_backend_keeps_inductor_cache_in_fastfeat_cache(tmp_path, user_dir):
    """Inductor's compiled kernels go to <fastfeat cache>/inductor (not /tmp, emptied by reboots),
    unless the user chose a place with $TORCHINDUCTOR_CACHE_DIR.  A fresh process: Inductor fixes its
    directory the first time it is used."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["FASTFEAT_CACHE"] = str(tmp_path / "ffcache")
    if user_dir:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / user_dir)
    code = (
        "import torch\n"
        "from fastfeat.backends import make_backend\n"
        "from fastfeat.models import get_model\n"
        "from fastfeat.weights import load_weights\n"
        "spec = get_model('caffenet')\n"
        "make_backend('compile', spec, load_weights(spec, 'random:0').tensors, torch.device('cpu'), torch.float32)\n"
        "from torch._inductor.runtime.cache_dir_utils import cache_dir\n"
        "print(cache_dir())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    want = tmp_path / user_dir if user_dir else tmp_path / "ffcache" / "inductor"
    assert out.stdout.strip().splitlines()[-1] == str(want)
