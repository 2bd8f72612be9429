import pytest
import torch

from fastfeat.backends import make_backend
from fastfeat.models import ALEXNET, CAFFENET, VGG16, get_model, parse_layers
from fastfeat.weights import load_weights


def test_mac_counts_match_analytic_figures():
    assert CAFFENET.total_macs() == 724_406_816
    assert ALEXNET.total_macs() == 714_188_480
    # The convolutions carry ~92% of caffenet's MACs (DeCAF's batch-mode observation).
    macs = CAFFENET.macs()
    conv = sum(v for k, v in macs.items() if k.startswith("conv"))
    assert 0.91 < conv / CAFFENET.total_macs() < 0.93
    # VGG-16: torchvision's documented 15.47 GFLOPS (really MACs); the fc layers carry under 1%.
    assert VGG16.total_macs() == 15_470_264_320
    assert sum(v for k, v in VGG16.macs().items() if k.startswith("fc")) == 123_633_664


def test_shapes():
    s = CAFFENET.shapes()
    assert s["conv1"] == (96, 55, 55) and s["pool1"] == (96, 27, 27) and s["norm2"] == (256, 13, 13)
    assert s["pool5"] == (256, 6, 6) and s["fc6"] == (4096,) and s["fc8"] == (1000,)
    a = ALEXNET.shapes()
    assert a["conv1"] == (64, 55, 55) and a["pool2"] == (192, 13, 13) and a["pool5"] == (256, 6, 6)
    v = VGG16.shapes()
    assert v["conv1_2"] == (64, 224, 224) and v["pool1"] == (64, 112, 112) and v["pool3"] == (256, 28, 28)
    assert v["conv5_3"] == (512, 14, 14) and v["pool5"] == (512, 7, 7) and v["fc6"] == (4096,)


def test_caffenet_param_shapes_follow_caffe():
    p = CAFFENET.param_shapes()
    assert p["conv2.weight"] == (256, 48, 5, 5)
    assert p["conv4.weight"] == (384, 192, 3, 3)
    assert p["fc6.weight"] == (4096, 9216)
    assert list(p)[0] == "conv1.weight" and list(p)[-1] == "fc8.bias"


@pytest.mark.parametrize("name", ["alexnet", "vgg16"])
def test_torchvision_param_keys_equal_torchvision_state_dict(name):
    tv = pytest.importorskip("torchvision.models")
    sd = getattr(tv, name)(weights=None).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == get_model(name).param_shapes()


def test_feature_info_lists_every_layer():
    info = CAFFENET.feature_info()
    assert [i["name"] for i in info] == CAFFENET.layer_names
    assert info[0] == {"name": "conv1", "kind": "conv", "shape": [96, 55, 55], "macs": 105_415_200}


def test_parse_layers():
    assert parse_layers(CAFFENET, "relu7,relu6") == ["relu6", "relu7"]
    with pytest.raises(ValueError, match="unknown layer 'fc9'"):
        parse_layers(CAFFENET, "fc9")
    with pytest.raises(ValueError, match="unknown model"):
        get_model("vgg99")


def test_forward_stops_after_deepest_requested_layer():
    w = load_weights(CAFFENET, "random:0")
    net = make_backend("torch", CAFFENET, w.tensors, torch.device("cpu"), torch.float32)
    ran = []
    ops = net.plan(["norm1"])
    for op in ops:  # what forward_intermediates runs, spied on
        object.__setattr__(op, "run", (lambda run, covers: lambda x: ran.extend(covers) or run(x))(op.run, op.covers))
    net.plan = lambda names: ops
    out = net.forward_intermediates(net.prepare(torch.randn(1, 227, 227, 3)), ["norm1"])
    assert ran == ["conv1", "relu1", "pool1", "norm1"]
    assert out["norm1"].shape == (1, 96, 27, 27)


def test_cpu_plan_fuses_conv_relu_only_when_the_conv_output_is_not_requested():
    w = load_weights(CAFFENET, "random:0")
    net = make_backend("torch", CAFFENET, w.tensors, torch.device("cpu"), torch.float32)
    assert [op.name for op in net.plan(["pool1"])] == ["conv1+relu1", "pool1"]
    assert [op.name for op in net.plan(["conv1", "pool1"])] == ["conv1", "relu1", "pool1"]
    x = net.prepare(torch.randn(2, 227, 227, 3, generator=torch.Generator().manual_seed(0)))
    fused = net.forward_intermediates(x, ["relu2"])["relu2"]
    unfused = net.forward_intermediates(x, ["conv1", "conv2", "relu2"])["relu2"]
    assert torch.equal(fused, unfused)  # the post-op ReLU is the same max(0, ·) of the same accumulator


def test_cpu_prepacked_conv_weights_match_plain_ops_at_every_batch_size():
    """Conv weights reordered ahead of time (oneDNN's layout, one per input shape) give the plain ops'
    results bit for bit, at a batch size, at another one, and back at the first."""
    w = load_weights(ALEXNET, "random:0")
    net = make_backend("torch", ALEXNET, w.tensors, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(1)
    for batch in (4, 3, 4):
        x = net.prepare(torch.randn(batch, 224, 224, 3, generator=gen))
        got = net.forward_intermediates(x, ["relu7"])["relu7"]
        h = x
        for name in ALEXNET.layer_names[: ALEXNET.index("relu7") + 1]:
            h = net.run_layer(ALEXNET.index(name), h)  # conv then ReLU apart, plain weights
        assert torch.equal(got, h), batch
    if not net.fuses_conv_relu:
        pytest.skip("no oneDNN in this torch build: the plain ops ran")
    assert {key[1][0] for key in net._packed_conv} == {4, 3}


def test_pre_activation_tap_is_not_overwritten_by_inplace_relu():
    w = load_weights(ALEXNET, "random:0")
    net = make_backend("torch", ALEXNET, w.tensors, torch.device("cpu"), torch.float32)
    out = net.forward_intermediates(net.prepare(torch.randn(2, 224, 224, 3)), ["fc7", "relu7"])
    assert (out["fc7"] < 0).any()
    torch.testing.assert_close(out["relu7"], out["fc7"].clamp_min(0))


def test_fp32_pool_tap_is_not_overwritten_by_the_following_lrn():
    w = load_weights(CAFFENET, "random:0")
    net = make_backend("torch", CAFFENET, w.tensors, torch.device("cpu"), torch.float32)
    x = net.prepare(torch.randn(1, 227, 227, 3) * 50)
    both = net.forward_intermediates(x, ["pool1", "norm1"])
    alone = net.forward_intermediates(x, ["pool1"])
    assert torch.equal(both["pool1"], alone["pool1"])
    assert not torch.equal(both["pool1"], both["norm1"])
