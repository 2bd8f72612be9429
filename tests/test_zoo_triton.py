"""torchvision models on the triton backend (fastfeat.zoo_table): the translation into a layer table, the
one-line refusals, and the forward pass against the torch backend (torchvision's own module) on the same
weights and a real photo, every tap.

Tolerance, fp32: TOL = 1e-4 on ‖triton − torch‖ / ‖torch‖ per tap.  Both sides compute exact fp32 up to
the summation order (the triton kernels' tiles against oneDNN's), which the built-in networks measure at
1.5e-6 (tests/test_triton_backend.py); 1e-4 leaves room for that to grow through eight layers and for the
small-norm taps, and is still far below any real error (a wrong pad, stride or column order gives > 1e-1).
Measured: 7.9e-8 (features.0), 2.6e-7 (features), 5.4e-7 (classifier.5), `fastfeat extract` of one photo
with each backend, AlexNet at random:0, --pool avg, on the 2-core box.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference import reference_preprocess, rel_err

from fastfeat.backends.triton_backend import TritonNet
from fastfeat.errors import ConfigError
from fastfeat.kernels import backend_available, interpreter_active
from fastfeat.layers import Conv, Linear, MaxPool, ReLU
from fastfeat.model_lookup import make_model_backend, resolve_model
from fastfeat.models import ALEXNET
from fastfeat.weights import load_weights
from fastfeat.zoo_table import NotTranslatable, table_for, translate, triton_refusal

TOL = 1e-4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not backend_available()[0], reason=backend_available()[1])


def _torchvision_module(spec, weights):
    module = spec.build_module()
    module.load_state_dict(weights.tensors)
    return module.eval()


def _photo_batch(photos, size: int) -> torch.Tensor:
    """One real photo, torchvision's preprocessing (tests/reference.py, no DALI), area-scaled to size."""
    x = reference_preprocess(next(p for p in photos if p.endswith(".jpg")), "alexnet")
    if size != x.shape[1]:
        x = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), size=(size, size), mode="area")
        x = x.permute(0, 2, 3, 1).contiguous()
    return x


@pytest.mark.slow  # builds AlexNet (61M parameters) three times: ~7 s on the loaded 2-core box
def test_alexnet_translates_to_the_builtin_table():
    """The translation of torchvision's AlexNet is the hand-written table of ``--model alexnet`` (which
    loads the same state dict), under torchvision's node names; identity nodes and containers are taps
    of the layer before them."""
    spec = resolve_model("torchvision:alexnet")
    table = table_for(spec)

    def described(layers):
        return [(type(layer), layer.params, layer.param_key) for layer in layers]

    assert described(table.spec.layers) == described(ALEXNET.layers)
    assert table.spec.layer_names[:3] == ["features.0", "features.1", "features.2"]
    assert table.spec.layer_names[-3:] == ["classifier.4", "classifier.5", "classifier.6"]
    assert set(table.sources) == set(spec.raw_shapes)  # every tap the torch backend offers
    for tap, layer in [("features.0", "features.0"), ("avgpool", "features.12"), ("flatten", "features.12"),
                       ("classifier.0", "features.12"), ("classifier.3", "classifier.2"),
                       ("features", "features.12"), ("classifier", "classifier.6")]:  # fmt: skip
        assert table.sources[tap] == layer, tap
    assert table.spec.param_shapes() == spec.state_shapes


def test_what_cannot_be_a_table_is_refused_in_one_line():
    from torch import nn

    resnet = triton_refusal(resolve_model("torchvision:resnet18"))
    assert "BatchNorm2d" in resnet and "\n" not in resnet and "use --backend torch or compile" in resnet
    assert triton_refusal(resolve_model("torchvision:alexnet")) is None

    def refusal(*layers, size=8):
        with pytest.raises(NotTranslatable) as refused:
            translate(nn.Sequential(*layers), "test", size)
        return str(refused.value)

    conv = nn.Conv2d(3, 4, 3)  # 8x8 -> 6x6
    assert "maps 6x6 to 2x2 at input 8" in refusal(conv, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 2))
    assert "unflattened 4x6x6 map" in refusal(conv, nn.Linear(6, 2))
    assert "dilated" in refusal(nn.Conv2d(3, 4, 3, dilation=2))
    assert "no layer for GELU" in refusal(conv, nn.GELU())
    assert "ceil_mode" in refusal(conv, nn.MaxPool2d(2, 3, ceil_mode=True))
    # The identity adaptive pool, a flatten and a dropout leave only the three layers that compute.
    table = translate(nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(6), nn.Flatten(), nn.Dropout(),
                                    nn.Linear(144, 2)), "test", 8)  # fmt: skip
    assert [type(x) for x in table.spec.layers] == [Conv, ReLU, Linear]
    assert table.sources == {"0": "0", "1": "1", "2": "1", "3": "1", "4": "1", "5": "5"}


def test_a_model_that_is_no_chain_is_refused_by_check_arguments():
    from fastfeat.arguments import check_arguments

    common = dict(weights="random:0", batch_size=4, shard_size=10, dtype="float16", precision=None, device="cpu",
                  format="parquet", max_pixels=10**8, num_threads=None, num_shards=1, shard_index=0,
                  max_error_rate=None)  # fmt: skip
    # SqueezeNet's leaf modules are all kinds a table holds; its Fire modules branch and concatenate.
    with pytest.raises(ConfigError, match=r"cannot run torchvision:squeezenet1_0: its forward is not a chain"):
        check_arguments(model="torchvision:squeezenet1_0", layers=None, backend="triton", **common)
    spec, names = check_arguments(model="torchvision:alexnet", layers=None, backend="triton", **common)
    assert names == list(spec.default_layers)


def test_zoo_triton_net_refuses_what_check_arguments_refuses():
    spec = resolve_model("torchvision:resnet18")
    with pytest.raises(ConfigError, match="BatchNorm2d"):
        make_model_backend("triton", spec, {}, DEVICE, torch.float32)


@needs_triton
@pytest.mark.slow  # interpreter: ~25 s (AlexNet at 67) and ~100 s (VGG-11 at 32) on the loaded 2-core box
@pytest.mark.parametrize("arch,size", [("alexnet", 67), ("vgg11", 32)])
def test_translated_features_on_the_kernels_equal_torchvision_at_a_reduced_input(arch, size, photos):
    """The table's conv side on fastfeat's kernels against torchvision's own ``features`` prefix, on a
    photo scaled down so that the interpreter runs it in seconds (the classifier needs the full input:
    the slow tests run it)."""
    spec = resolve_model(f"torchvision:{arch}")
    weights = load_weights(spec, "random:0")
    table = table_for(spec).spec
    conv_side = table.layers[: next(i for i, layer in enumerate(table.layers) if isinstance(layer, Linear))]
    small = dataclasses.replace(table, input_size=size, layers=conv_side)
    net = TritonNet(small, weights.tensors, DEVICE, torch.float32)
    # Every conv's pre-activation, and every pool (ceil: a relu+pool op, or a lone pool after a tapped relu).
    taps = [layer.name for layer in small.layers if isinstance(layer, (Conv, MaxPool))]
    x = _photo_batch(photos, size)
    got = net.forward_intermediates(net.prepare(x), taps)
    module = _torchvision_module(spec, weights)
    with torch.no_grad():
        t = x.permute(0, 3, 1, 2).contiguous()
        for i, layer in enumerate(module.features):
            t = layer(t.clone())
            if f"features.{i}" in got:
                err = rel_err(got[f"features.{i}"].cpu(), t)
                assert err <= TOL, (arch, i, err)


@needs_triton
@pytest.mark.slow
def test_alexnet_on_triton_equals_the_torch_backend_every_tap(photos):
    """Whole AlexNet at 224 on one photo: every tap unpooled (``--pool none``), then the default taps
    pooled (``avg``) on the fused path (conv+ReLU, ReLU+pool, fc+ReLU in one kernel each)."""
    for pool, taps in (("none", None), ("avg", ["features.5", "features", "flatten", "classifier.5"])):
        spec = resolve_model("torchvision:alexnet", pool)
        taps = taps or spec.layer_names
        weights = load_weights(spec, "random:0")
        x = _photo_batch(photos, spec.input_size)
        tri = make_model_backend("triton", spec, weights.tensors, DEVICE, torch.float32)
        ref = make_model_backend("torch", spec, weights.tensors, torch.device("cpu"), torch.float32)
        got = tri.forward_intermediates(tri.prepare(x), taps)
        want = ref.forward_intermediates(ref.prepare(x), taps)
        shapes = spec.shapes()
        for name in taps:
            assert tuple(got[name].shape) == tuple(want[name].shape) == (1, *shapes[name]), name
            err = rel_err(got[name].reshape(1, -1).cpu(), want[name].reshape(1, -1))
            assert err <= TOL, (pool, name, err)


@pytest.mark.slow
@pytest.mark.skipif(interpreter_active() or not backend_available()[0], reason="GPU only: VGG-11 at 224 takes "
                    "minutes in the interpreter; its layers run there at a reduced input (above)")  # fmt: skip
def test_vgg11_on_triton_equals_the_torch_backend(photos):
    spec = resolve_model("torchvision:vgg11", "none")
    weights = load_weights(spec, "random:0")
    x = _photo_batch(photos, spec.input_size)
    taps = ["features.0", "features.10", "features", "flatten", "classifier.1", "classifier"]
    tri = make_model_backend("triton", spec, weights.tensors, DEVICE, torch.float32)
    ref = make_model_backend("torch", spec, weights.tensors, DEVICE, torch.float32)
    got = tri.forward_intermediates(tri.prepare(x), taps)
    want = ref.forward_intermediates(ref.prepare(x), taps)
    for name in taps:
        assert rel_err(got[name].reshape(1, -1).float().cpu(), want[name].reshape(1, -1).float().cpu()) <= TOL, name


@pytest.mark.slow  # AlexNet built three times and run at 224: ~6 s on the loaded 2-core box
def test_a_tapped_pre_activation_is_not_overwritten_by_the_in_place_relu():
    """torchvision's ReLU(inplace=True) writes over the conv output it takes: the torch backend's tap of
    ``features.0`` must still be the conv's, with a deeper tap running that ReLU (fastfeat.taps copies)."""
    spec = resolve_model("torchvision:alexnet", "none")
    weights = load_weights(spec, "random:1")
    net = make_model_backend("torch", spec, weights.tensors, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 224, 224, 3, generator=torch.Generator().manual_seed(3))
    got = net.forward_intermediates(net.prepare(x), ["features.0", "features.1", "features.3"])
    conv = _torchvision_module(spec, weights).features[0]
    with torch.no_grad():
        want = conv(x.permute(0, 3, 1, 2))
    assert (want < 0).any() and torch.allclose(got["features.0"], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got["features.1"], torch.relu(got["features.0"]))
