import numpy as np
import pytest
import torch

from fastfeat.caffemodel import _len_field as field
from fastfeat.caffemodel import read_caffemodel, write_caffemodel
from fastfeat.models import ALEXNET, CAFFENET
from fastfeat.weights import WeightsError, load_weights, random_weights


@pytest.fixture(scope="module")
def caffenet_state():
    return random_weights(CAFFENET, 3)


def _equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_random_weights_are_seeded_and_labelled():
    a, b, c = (load_weights(CAFFENET, s) for s in ("random:1", "random:1", "random:2"))
    _equal(a.tensors, b.tensors)
    assert a.sha256 == b.sha256 != c.sha256
    assert a.is_random and a.source == "random:1"


def test_pth_roundtrip_weights_only(tmp_path, caffenet_state):
    path = tmp_path / "w.pth"
    torch.save(caffenet_state, path)
    w = load_weights(CAFFENET, str(path))
    _equal(w.tensors, caffenet_state)
    assert not w.is_random and len(w.sha256) == 64


def test_torchvision_alexnet_state_dict_loads_unchanged(tmp_path):
    tv = pytest.importorskip("torchvision.models")
    sd = tv.alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet-owt.pth"
    torch.save(sd, path)
    _equal(load_weights(ALEXNET, str(path)).tensors, dict(sd))


def test_safetensors(tmp_path, caffenet_state):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(caffenet_state, str(path))
    _equal(load_weights(CAFFENET, str(path)).tensors, caffenet_state)


@pytest.mark.parametrize("legacy_v1", [True, False], ids=["V1-layers", "V2-layer"])
def test_caffemodel(tmp_path, caffenet_state, legacy_v1):
    path = tmp_path / "bvlc_reference_caffenet.caffemodel"
    path.write_bytes(write_caffemodel({k: v.numpy() for k, v in caffenet_state.items()}, legacy_v1=legacy_v1))
    _equal(load_weights(CAFFENET, str(path)).tensors, caffenet_state)


def test_caffemodel_reader_skips_unknown_fields():
    # A layer with bottom/top strings and a data layer without blobs, as real files have.
    blob = write_caffemodel({"ip.weight": np.ones((2, 3), np.float32)})
    extra = field(100, field(1, b"data") + field(2, b"Data") + field(4, b"data"))
    params = read_caffemodel(extra + blob)
    assert list(params) == ["ip.weight"] and params["ip.weight"].shape == (2, 3)


def test_wrong_key_is_named(tmp_path, caffenet_state):
    bad = dict(caffenet_state)
    bad["conv9.weight"] = bad.pop("conv3.weight")
    torch.save(bad, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="missing key 'conv3.weight'"):
        load_weights(CAFFENET, str(tmp_path / "w.pth"))


def test_wrong_shape_is_named(tmp_path, caffenet_state):
    bad = dict(caffenet_state)
    bad["conv2.weight"] = torch.zeros(256, 96, 5, 5)  # ungrouped: Caffe's is 256x48x5x5
    torch.save(bad, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"key 'conv2.weight' has shape \(256, 96, 5, 5\)"):
        load_weights(CAFFENET, str(tmp_path / "w.pth"))


def test_other_models_weights_are_refused(tmp_path):
    torch.save(random_weights(ALEXNET, 0), tmp_path / "alexnet.pth")
    with pytest.raises(WeightsError, match="missing key 'conv1.weight'"):
        load_weights(CAFFENET, str(tmp_path / "alexnet.pth"))


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors", "w.caffemodel"])
def test_garbage_file_gives_one_line_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(WeightsError) as e:
        load_weights(CAFFENET, str(tmp_path / name))
    assert "cannot read weights" in str(e.value) and "\n" not in str(e.value)


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_weights(CAFFENET, str(tmp_path / "evil.pth"))


def test_bad_random_spec():
    with pytest.raises(WeightsError, match="random:SEED"):
        load_weights(CAFFENET, "random:abc")
    with pytest.raises(WeightsError, match="not found"):
        load_weights(CAFFENET, "/nonexistent/w.pth")


def test_malicious_caffemodel_fails_fast_without_huge_allocation(tmp_path):
    import resource

    from fastfeat.caffemodel import _encode_varint, _key

    # A blob whose float data field is a varint of 2^28: bytes(2^28) would allocate 256 MiB.
    blob = _key(5, 0) + _encode_varint(1 << 28)
    layer = field(1, b"conv1") + field(7, blob)
    (tmp_path / "evil.caffemodel").write_bytes(field(100, layer))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_weights(CAFFENET, str(tmp_path / "evil.caffemodel"))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_caffemodel_shape_larger_than_data_is_refused():
    blob = field(7, field(1, b"".join(bytes([v]) for v in (100, 100, 100)))) + field(5, b"\0" * 16)
    with pytest.raises(ValueError, match="does not match"):
        read_caffemodel(field(100, field(1, b"conv1") + field(7, blob)))
