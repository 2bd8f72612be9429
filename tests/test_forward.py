"""The torch backend against independent plain-PyTorch references, on real photos, per precision."""

import pytest
import torch
from reference import reference_model, reference_preprocess, rel_err

from fastfeat.backends import make_backend
from fastfeat.models import get_model
from fastfeat.weights import load_weights

# ‖out − ref‖ / ‖ref‖ against the fp32 reference.  bf16 keeps 8 mantissa bits (2^-9 ≈ 0.2% per
# rounding, accumulated over 8 layers: measured 0.4-0.6%); fp16 keeps 11 (measured 0.06-0.08%).
TOLERANCES = {"fp32": 1e-5, "bf16": 1.5e-2, "fp16": 2e-3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TAPS = ["norm2", "pool5", "fc6", "relu6", "relu7", "fc8"]


@pytest.fixture(scope="module", params=["caffenet", "alexnet"])
def model_case(request, photos):
    name = request.param
    spec = get_model(name)
    weights = load_weights(spec, "random:7")
    x = torch.cat([reference_preprocess(p, name) for p in photos[:4]])
    with torch.no_grad():
        ref = reference_model(name, weights.tensors)(x.permute(0, 3, 1, 2).contiguous())
    return spec, weights, x, ref


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
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
