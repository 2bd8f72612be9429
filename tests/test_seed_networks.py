"""The seed papers' other networks: CNN-F/M/M-2048/S (Chatfield et al. 2014) and OverFeat fast/accurate.

Layer tables and MACs against the released definitions, every weights format they are published in (a
state dict keyed by the Caffe names, MatConvNet .mat in both key layouts, a .caffemodel with the
VGG_mean.binaryproto mean, OverFeat's raw float32 files) written here and read back, and the compile and
triton backends against the torch backend.  Fidelity against tests/reference.py on real photos per
precision is tests/test_forward.py's (it runs every registered model).

Files are written at a reduced width (every conv and fc output divided by ``NARROW``, same kernels, strides,
pads, pools and LRN) where the full networks would take hundreds of MB per file.
"""

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from reference import rel_err

from fastfeat.backends import make_backend, unavailable_reason
from fastfeat.caffemodel import write_blobproto, write_caffemodel
from fastfeat.decode import PreprocessError, load_mean
from fastfeat.kernels import backend_available, interpreter_active
from fastfeat.layers import LRN, Conv, Linear, MaxPool
from fastfeat.models import get_model
from fastfeat.weights import WeightsError, load_weights

SEED_NETWORKS = ["cnn-f", "cnn-m", "cnn-m-2048", "cnn-s", "overfeat-fast", "overfeat-accurate"]
NARROW = 8


def narrow(name: str, input_size: int | None = None):
    """The network with every conv/fc output divided by NARROW (fc8 included), optionally a smaller input."""
    spec = get_model(name)
    layers = tuple(
        dataclasses.replace(layer, out=layer.out // NARROW) if isinstance(layer, (Conv, Linear)) else layer
        for layer in spec.layers
    )
    return dataclasses.replace(
        spec, layers=layers, input_size=input_size or spec.input_size, expected_macs=None, expected_shapes={}
    )


# -- layer tables ---------------------------------------------------------------------------------------
# Per network: (input, fc6 inputs, fc6/fc7 outputs, total parameters).  fc6's inputs are the paper's
# (Chatfield et al.: 9,216 for F, 18,432 for M and S) and OverFeat's 1024×6×6 / 1024×5×5 maps; OverFeat's
# parameter counts are the end offsets of jhjin/overfeat-torch run.lua's ParamBank reads (145,919,872 + 1,000
# and 144,655,488 + 1,000 floats).
TABLE = {
    "cnn-f": (224, 9216, (4096, 4096), 60_834_536),
    "cnn-m": (224, 18432, (4096, 4096), 102_908_520),
    "cnn-m-2048": (224, 18432, (4096, 2048), 92_469_864),
    "cnn-s": (224, 18432, (4096, 4096), 102_908_520),
    "overfeat-fast": (231, 36864, (3072, 4096), 145_920_872),
    "overfeat-accurate": (221, 25600, (4096, 4096), 144_656_488),
}


@pytest.mark.parametrize("name", SEED_NETWORKS)
def test_layer_table(name):
    spec = get_model(name)
    size, fc6_in, (fc6, fc7), params = TABLE[name]
    assert spec.input_size == spec.preprocess.crop == size
    shapes, inputs = spec.shapes(), spec.input_shapes()
    assert math.prod(inputs["fc6"]) == fc6_in
    assert shapes["fc6"] == (fc6,) and shapes["fc7"] == (fc7,) and shapes["fc8"] == (1000,)
    assert sum(math.prod(s) for s in spec.param_shapes().values()) == params
    assert list(spec.param_shapes())[:2] == ["conv1.weight", "conv1.bias"] and "fc8.bias" in spec.param_shapes()
    # MACs: every layer's own formula, summed independently of the spec's macs().
    total = 0
    for layer in spec.layers:
        if isinstance(layer, Conv):
            c, oh, ow = shapes[layer.name]
            total += oh * ow * c * layer.kernel**2 * inputs[layer.name][0]
        elif isinstance(layer, Linear):
            total += math.prod(inputs[layer.name]) * layer.out
    assert total == spec.total_macs() == spec.expected_macs


def test_vgg_cnn_details_follow_the_prototxts():
    f, m, s = get_model("cnn-f"), get_model("cnn-m"), get_model("cnn-s")
    for spec in (f, m, s):
        norms = [layer for layer in spec.layers if isinstance(layer, LRN)]
        assert all((n.size, n.alpha, n.beta, n.k) == (5, 5e-4, 0.75, 2.0) for n in norms)
        assert all(p.ceil for p in spec.layers if isinstance(p, MaxPool))  # Caffe rounds pooled sizes up
        # LRN before the pool: relu1 -> norm1 -> pool1
        assert spec.layer_names[1:4] == ["relu1", "norm1", "pool1"]
        assert spec.preprocess.channel_order == "BGR" and spec.preprocess.resize == 256
    assert [layer.name for layer in s.layers if isinstance(layer, LRN)] == ["norm1"]
    assert (s.layer("pool1").stride, s.layer("pool2").kernel, s.layer("pool5").stride) == (3, 2, 3)
    assert (m.layer("conv2").stride, m.layer("conv2").pad) == (2, 1)
    # Pooled sizes that only ceil mode gives: CNN-M pool1 on 109 -> 54 (floor also 54), CNN-S pool1 on 109 -> 37
    # (floor 36), CNN-F pool5 on 13 -> 6.
    assert s.shapes()["pool1"] == (96, 37, 37) and f.shapes()["pool5"] == (256, 6, 6)


def test_overfeat_preprocessing_is_run_lua_s():
    for name, size in (("overfeat-fast", 231), ("overfeat-accurate", 221)):
        pre = get_model(name).preprocess
        assert (pre.resize, pre.crop, pre.channel_order) == (size, size, "RGB")
        assert pre.mean == (118.380948,) * 3 and pre.std == (61.896913,) * 3


# -- weights files ----------------------------------------------------------------------------------------
def _equal(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_state_dict_keyed_by_caffe_names(tmp_path, ext):
    spec = narrow("cnn-m-2048")
    state = load_weights(spec, "random:3").tensors
    path = tmp_path / f"w{ext}"
    if ext == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, path)
    _equal(load_weights(spec, str(path)).tensors, state)


def _matconvnet_layers(spec, state: dict, layout: str) -> np.ndarray:
    """A SimpleNN ``layers`` cell array as vlfeat/matconvnet utils/import-caffe.py writes it: conv filters
    kh×kw×in×out (Caffe's out×in×kh×kw transposed), fc layers as convs over the whole C×H×W map, conv1 in
    RGB (the fastfeat spec reads BGR), non-weight layers in between."""
    inputs = spec.input_shapes()
    cells, first = [], True
    for layer in spec.layers:
        entry = {"name": layer.name}
        if isinstance(layer, (Conv, Linear)):
            w = state[f"{layer.name}.weight"].numpy()
            b = state[f"{layer.name}.bias"].numpy().reshape(1, -1)
            if isinstance(layer, Linear):
                chw = inputs[layer.name] if len(inputs[layer.name]) == 3 else (*inputs[layer.name], 1, 1)
                w = w.reshape(layer.out, *chw)
            if first:
                w, first = w[:, ::-1], False  # the file's conv1 reads RGB
            filters = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
            entry.update(type="conv", stride=[1.0, 1.0], pad=[0.0] * 4)
            if layout == "beta16":
                weights = np.empty((1, 2), dtype=object)
                weights[0, 0], weights[0, 1] = filters, b
                entry["weights"] = weights
            else:
                entry.update(filters=filters, biases=b)
        elif isinstance(layer, LRN):
            entry.update(type="normalize", param=[layer.size, layer.k, layer.alpha / layer.size, layer.beta])
        elif isinstance(layer, MaxPool):
            entry.update(type="pool", method="max", pool=[float(layer.kernel)] * 2, stride=[float(layer.stride)] * 2)
        else:
            entry.update(type="relu")
        cells.append(entry)
    out = np.empty((1, len(cells)), dtype=object)
    for i, c in enumerate(cells):
        out[0, i] = c
    return out


@pytest.mark.parametrize("layout", ["beta16", "old"])
@pytest.mark.parametrize("name", ["cnn-s", "overfeat-fast"])
def test_matconvnet_mat_both_layouts(tmp_path, name, layout):
    import scipy.io

    spec = narrow(name)
    state = load_weights(spec, "random:5").tensors
    average = np.random.default_rng(0).uniform(0, 255, (224, 224, 3)).astype(np.float32)  # RGB, as MatConvNet's
    normalization = {"averageImage": average, "imageSize": [224.0, 224.0, 3.0], "keepAspect": 1}
    mat = {"layers": _matconvnet_layers(spec, state, layout)}
    if layout == "beta16":
        mat["meta"] = {"normalization": normalization}
    else:
        mat["normalization"] = normalization
    path = tmp_path / f"imagenet-{name}.mat"
    scipy.io.savemat(path, mat, oned_as="row")
    loaded = load_weights(spec, str(path)).tensors
    if spec.preprocess.channel_order == "BGR":
        _equal(loaded, state)
    else:  # OverFeat reads RGB: the file's (RGB) conv1 is the state's conv1 flipped
        want = dict(state, **{"conv1.weight": state["conv1.weight"].flip(1)})
        _equal(loaded, want)
    # The file's conv1 on an RGB image equals fastfeat's conv1 on the image in the spec's channel order.
    rgb = torch.randn(1, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(1))
    raw = scipy.io.loadmat(path)["layers"][0, 0][0, 0]
    file_filters = raw["weights"][0, 0] if layout == "beta16" else raw["filters"]
    file_conv1 = torch.from_numpy(np.ascontiguousarray(np.asarray(file_filters).transpose(3, 2, 0, 1)))
    want = torch.nn.functional.conv2d(rgb, file_conv1, loaded["conv1.bias"], stride=spec.layer("conv1").stride)
    x = rgb.flip(1) if spec.preprocess.channel_order == "BGR" else rgb
    net = make_backend("torch", spec, loaded, torch.device("cpu"), torch.float32)
    got = net.forward_intermediates(net.prepare(x.permute(0, 2, 3, 1)), ["conv1"])["conv1"]
    assert rel_err(got, want) < 1e-6
    # The mean: the normalisation block's averageImage, turned into the model's channel order.
    mean = load_mean(str(path), 224, 256, spec.preprocess.channel_order)
    assert np.array_equal(mean, average[..., ::-1] if spec.preprocess.channel_order == "BGR" else average)


def test_matconvnet_mean_per_channel_and_errors(tmp_path):
    import scipy.io

    path = tmp_path / "m.mat"
    scipy.io.savemat(path, {"meta": {"normalization": {"averageImage": np.array([[123.0], [117.0], [104.0]])}}})
    assert load_mean(str(path), 224, 256, "BGR").tolist() == [104.0, 117.0, 123.0]
    assert load_mean(str(path), 224, 256, "RGB").tolist() == [123.0, 117.0, 104.0]
    scipy.io.savemat(path, {"meta": {"classes": [1.0]}})
    with pytest.raises(PreprocessError, match="averageImage"):
        load_mean(str(path), 224, 256, "BGR")
    with pytest.raises(WeightsError, match="no 'layers' variable"):
        load_weights(get_model("cnn-f"), str(path))
    # A file of another network: the conv count or a layer's size says so, in one line.
    spec = narrow("cnn-f")
    scipy.io.savemat(path, {"layers": _matconvnet_layers(spec, load_weights(spec, "random:1").tensors, "beta16")})
    with pytest.raises(WeightsError, match=r"layer 'conv1' has .* filter .* cnn-m conv1 expects \(7, 7, 3, 12\)"):
        load_weights(narrow("cnn-m"), str(path))
    with pytest.raises(WeightsError, match="8 conv layers with weights, model 'overfeat-accurate' has 9"):
        load_weights(narrow("overfeat-accurate"), str(path))


@pytest.mark.parametrize("legacy_v1", [True, False])
def test_caffemodel_and_vgg_mean_binaryproto(tmp_path, legacy_v1):
    spec = narrow("cnn-f")
    state = load_weights(spec, "random:9").tensors
    path = tmp_path / "VGG_CNN_F.caffemodel"
    path.write_bytes(write_caffemodel({k: v.numpy() for k, v in state.items()}, legacy_v1=legacy_v1))
    _equal(load_weights(spec, str(path)).tensors, state)
    # VGG_mean.binaryproto: a BGR 3×H×W BlobProto; centre-cropped to the crop, HWC, in the model's order.
    chw = np.random.default_rng(2).uniform(0, 255, (3, 256, 256)).astype(np.float32)
    mean_path = tmp_path / "VGG_mean.binaryproto"
    mean_path.write_bytes(write_blobproto(chw[None]))
    hwc = chw.transpose(1, 2, 0)[16:240, 16:240]
    assert np.array_equal(load_mean(str(mean_path), 224, 256, "BGR"), hwc)
    assert np.array_equal(load_mean(str(mean_path), 224, 256, "RGB"), hwc[..., ::-1])
    mean_path.write_bytes(write_blobproto(chw[:, :100, :100]))
    with pytest.raises(PreprocessError, match=r"S >= 224"):
        load_mean(str(mean_path), 224, 256, "BGR")
    mean_path.write_bytes(b"\x08\x01")  # num=1 and no values
    with pytest.raises(PreprocessError, match="cannot read mean file .*not a caffe BlobProto"):
        load_mean(str(mean_path), 224, 256, "BGR")


@pytest.mark.parametrize("name", ["overfeat-fast", "overfeat-accurate"])
def test_overfeat_raw_float32(tmp_path, name):
    spec = narrow(name)
    state = load_weights(spec, "random:4").tensors
    path = tmp_path / ("net_weight_0" if name == "overfeat-fast" else "net_weight_1")
    # run.lua's order: per layer the weight (out×in×kh×kw; fc layers as convs over the whole map), then the bias.
    with open(path, "wb") as f:
        for layer in spec.layers:
            if isinstance(layer, (Conv, Linear)):
                f.write(state[f"{layer.name}.weight"].numpy().astype("<f4").tobytes())
                f.write(state[f"{layer.name}.bias"].numpy().astype("<f4").tobytes())
    _equal(load_weights(spec, str(path)).tensors, state)
    # One float short, or the other network's file: one line, before any value is read.
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(WeightsError, match=rf"has {len(data) - 4:,} bytes; {name}'s layer table needs {len(data):,}"):
        load_weights(spec, str(path))


def test_overfeat_full_size_byte_counts_are_the_released_files():
    """The released net_weight_0/1 sizes follow from run.lua's ParamBank offsets (floats × 4)."""
    from fastfeat.overfeat import expected_bytes

    assert expected_bytes(get_model("overfeat-fast")) == (145_919_872 + 1000) * 4
    assert expected_bytes(get_model("overfeat-accurate")) == (144_655_488 + 1000) * 4


# -- backends ---------------------------------------------------------------------------------------------
# Reduced inputs that keep every layer (pool5/pool6 at least 1×1): the interpreter and Inductor at full size
# would take minutes per network.
SMALL_INPUT = {"cnn-f": 99, "cnn-m": 99, "cnn-m-2048": 99, "cnn-s": 131, "overfeat-fast": 103, "overfeat-accurate": 113}
TAPS = ["norm1", "pool1", "norm2", "pool2", "pool5", "pool6", "fc6", "relu6", "fc7", "relu7", "fc8"]


def _compare(backend: str, name: str, dtype=torch.float32, tol=1e-5):
    spec = narrow(name, SMALL_INPUT[name])
    tensors = load_weights(spec, "random:7").tensors
    x = torch.randn(2, spec.input_size, spec.input_size, 3, generator=torch.Generator().manual_seed(7))
    taps = [t for t in TAPS if t in spec.layer_names]
    ref = make_backend("torch", spec, tensors, torch.device("cpu"), dtype)
    got_net = make_backend(backend, spec, tensors, torch.device("cpu"), dtype)
    want = ref.forward_intermediates(ref.prepare(x), taps)
    got = got_net.forward_intermediates(got_net.prepare(x), taps)
    for t in taps:
        assert got[t].shape == want[t].shape == (2, *spec.shapes()[t]), t
        err = rel_err(got[t].reshape(2, -1).float(), want[t].reshape(2, -1).float())
        assert err < tol, (name, t, err)


def test_small_inputs_keep_every_layer():
    for name, size in SMALL_INPUT.items():
        shapes = narrow(name, size).shapes()
        assert all(min(s) >= 1 for s in shapes.values()), name


@pytest.mark.slow
@pytest.mark.skipif(not backend_available()[0], reason=backend_available()[1])
@pytest.mark.parametrize(
    "name,dtype",
    [(name, torch.float32) for name in SEED_NETWORKS] + [("cnn-f", torch.bfloat16), ("overfeat-fast", torch.bfloat16)],
    ids=str,
)
def test_triton_backend_matches_torch(name, dtype):
    """Whole network under the interpreter on CPU (on a GPU, there); bf16: two independent roundings per layer."""
    if not interpreter_active() and not torch.cuda.is_available():
        pytest.skip("triton needs CUDA or the interpreter")
    _compare("triton", name, dtype, tol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn-s", "overfeat-accurate"])
def test_compile_backend_matches_torch(name):
    if (why := unavailable_reason("compile", torch.device("cpu"))) is not None:
        pytest.skip(why)
    _compare("compile", name)


# -- published names --------------------------------------------------------------------------------------
def test_published_names_are_listed_with_their_source_but_never_downloaded_unchecked(tmp_path, monkeypatch, capsys):
    from fastfeat.cli import main
    from fastfeat.published import PUBLISHED, DownloadError

    monkeypatch.setenv("FASTFEAT_CACHE", str(tmp_path))
    names = {n: e for n, e in PUBLISHED.items() if e.model in SEED_NETWORKS}
    assert {e.model for e in names.values()} == set(SEED_NETWORKS)
    assert (
        names["cnn-s-caffe"].url
        == "http://www.robots.ox.ac.uk/~vgg/software/deep_eval/releases/bvlc/VGG_CNN_S.caffemodel"
    )
    assert names["cnn-m-2048-matconvnet"].url == "http://www.vlfeat.org/matconvnet/models/imagenet-vgg-m-2048.mat"
    assert main(["weights", "list"]) == 0
    text = capsys.readouterr().out
    for name, entry in names.items():
        assert entry.checksum_kind == "none" and entry.size is None  # none is published in any source read
        assert re.search(rf"^{name} +{entry.model} +size \? +listed only", text, re.M), name
        assert entry.url in text
    with pytest.raises(
        DownloadError, match=r"cnn-f-caffe: no checksum or size is published.*download http://www\.robots"
    ):
        load_weights(get_model("cnn-f"), "cnn-f-caffe")
    assert main(["weights", "download", "overfeat-fast-imagenet"]) == 2
    err = capsys.readouterr().err
    assert "overfeat-weights.tgz" in err and "\n" not in err.strip()
    assert not list(tmp_path.rglob("*"))  # nothing cached, nothing half-written


@pytest.mark.slow
def test_extract_with_each_mean_file_format_gives_the_same_features(tmp_path, capsys):
    """`--mean-file` as VGG_mean.binaryproto (BGR CHW BlobProto), a MatConvNet .mat (RGB averageImage) and
    the .npy it equals (BGR HWC): one mean image, the same features end to end."""
    import scipy.io
    from helpers import column_matrix, read_features

    from fastfeat.cli import main

    chw = np.random.default_rng(3).uniform(90, 130, (3, 224, 224)).astype(np.float32)  # BGR
    files = {
        "binaryproto": tmp_path / "VGG_mean.binaryproto",
        "mat": tmp_path / "imagenet-vgg-f.mat",
        "npy": tmp_path / "mean.npy",
    }
    files["binaryproto"].write_bytes(write_blobproto(chw[None]))
    scipy.io.savemat(files["mat"], {"meta": {"normalization": {"averageImage": chw.transpose(1, 2, 0)[..., ::-1]}}})
    np.save(files["npy"], chw.transpose(1, 2, 0))
    feats = {}
    for kind, path in files.items():
        out = tmp_path / f"out-{kind}"
        args = ["extract", "--sample", "--model", "cnn-f", "--weights", "random:0", "--mean-file", str(path)]
        assert main([*args, "--layers", "pool5,relu7", "--dtype", "float32", "--out", str(out), "--no-progress"]) == 0
        table = read_features(str(out))
        feats[kind] = {layer: column_matrix(table, layer) for layer in ("pool5", "relu7")}
        assert (
            table.column("id").to_pylist() == read_features(str(tmp_path / "out-binaryproto")).column("id").to_pylist()
        )
    capsys.readouterr()
    for kind in ("binaryproto", "mat"):
        for layer in ("pool5", "relu7"):
            assert feats[kind][layer].shape[0] == 5 and np.isfinite(feats[kind][layer]).all()
            assert np.array_equal(feats[kind][layer], feats["npy"][layer]), (kind, layer)
