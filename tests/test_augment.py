"""Test-time augmentation (extract --augment): every view against an independent PIL/torchvision crop,
every view's features against the reference network, and the reduction against numpy's."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from helpers import fast_first
from PIL import Image
from reference import reference_model, rel_err

import fastfeat
from fastfeat.augment import AUGMENTS, augmented_mean, get_views
from fastfeat.backends import make_backend
from fastfeat.cli import main
from fastfeat.decode import Decoder, read_image
from fastfeat.forward import Forward
from fastfeat.models import get_model
from fastfeat.sources import Item
from fastfeat.weights import load_weights

PREPROCESS_TOL = 0.012  # DALI's and torch's bilinear resamplers round differently (tests/test_preprocess.py)
FP32_TOL = 1e-5  # same pixels, fp32 both sides: summation order only
# End to end, 10-view mean of relu7 against the PIL/torch views through the reference network: the
# resampler difference above, mostly averaged out over the views (measured 0.07-0.11%).
E2E_TOL = 0.01


def reference_views(path: str, model: str) -> torch.Tensor:
    """The 10 views, NHWC float32, in fastfeat's order (centre, TL, TR, BL, BR, then their mirrors), made
    with PIL + torch (caffenet: Caffe's warp and oversample offsets) or torchvision's own FiveCrop."""
    img = Image.open(path).convert("RGB")
    a = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    if model == "caffenet":
        a = F.interpolate(a, size=(256, 256), mode="bilinear", align_corners=False, antialias=False).flip(1)  # BGR
        c, far = 227, 256 - 227
        crops = [a[..., y : y + c, x : x + c] for y, x in ((14, 14), (0, 0), (0, far), (far, 0), (far, far))]
        mean, std = torch.tensor([104.0, 117.0, 123.0]), torch.ones(3)
    else:
        from torchvision.transforms.v2 import functional as TF

        tl, tr, bl, br, centre = TF.five_crop(TF.resize(a, 256, antialias=True), 224)
        crops = [centre, tl, tr, bl, br]
        mean, std = torch.tensor([0.485, 0.456, 0.406]) * 255, torch.tensor([0.229, 0.224, 0.225]) * 255
    crops += [v.flip(-1) for v in crops]
    x = torch.cat(crops)
    x = (x - mean[None, :, None, None]) / std[None, :, None, None]
    return x.permute(0, 2, 3, 1).contiguous()


def _decode_views(model: str, paths: list[str], augment: str = "10crop", mean_image=None) -> torch.Tensor:
    spec = get_model(model)
    dec = Decoder(spec.preprocess, len(paths), torch.device("cpu"), mean_image=mean_image, views=get_views(augment))
    read = [read_image(Item(p, p, None), 10**9) for p in paths]
    batch, bad, _ = dec.decode([r[0] for r in read], [r[1] for r in read])
    assert bad == {}
    return batch


@pytest.mark.parametrize("model", fast_first(["caffenet", "alexnet"]))
def test_each_view_matches_an_independent_crop(model, photos):
    paths = photos[:4]
    batch = _decode_views(model, paths)
    crop = get_model(model).preprocess.crop
    assert batch.shape == (len(paths) * 10, crop, crop, 3)  # image-major: image i's views are rows 10i..10i+9
    for i, p in enumerate(paths):
        ref = reference_views(p, model)
        views = batch[10 * i : 10 * i + 10]
        for v in range(10):
            err = rel_err(views[v], ref[v])
            assert err < PREPROCESS_TOL, (p, AUGMENTS["10crop"][v].name, err)
        for v in range(5):  # a mirrored view is exactly its crop flipped left-right
            assert torch.equal(views[5 + v], views[v].flip(1))
        assert rel_err(views[1], views[4]) > 0.05  # the corners really are different crops


def test_subsets_are_the_same_crops(photos):
    full = _decode_views("alexnet", photos[:2])
    for augment in ("center", "flip", "center+flip", "5crop"):
        names = [v.name for v in get_views(augment)]
        index = [[v.name for v in AUGMENTS["10crop"]].index(n) for n in names]
        got = _decode_views("alexnet", photos[:2], augment)
        want = torch.cat([full[10 * i : 10 * i + 10][index] for i in range(2)])
        assert torch.equal(got, want), augment


@pytest.mark.parametrize("reduce", fast_first(["mean", "max"]))
def test_view_features_and_reduction_match_the_reference_network(reduce, photos):
    """Forward with views: each view through the reference network (fp32) on the same pixels, then
    numpy's mean / max over the views."""
    spec = get_model("caffenet")
    weights = load_weights(spec, "random:3").tensors
    x = _decode_views("caffenet", photos[:3])
    with torch.no_grad():
        ref = reference_model("caffenet", weights)(x.permute(0, 3, 1, 2).contiguous())
    net = make_backend("torch", spec, weights, torch.device("cpu"), torch.float32)
    per_view = net.forward_intermediates(net.prepare(x), ["pool5", "relu7"])
    for name in ("pool5", "relu7"):  # every view's features are the reference network's on that crop
        assert rel_err(per_view[name].float(), ref[name]) < FP32_TOL, name
    busy = dict.fromkeys(("h2d", "forward", "d2h"), 0.0)
    good = [0, 2]  # image 1 "failed": its views are computed but its row is not returned
    out = Forward(net, ["pool5", "relu7"], "float32", views=10, reduce=reduce)(x, good, busy)
    for name in ("pool5", "relu7"):
        views = ref[name].reshape(3, 10, -1).numpy()
        want = views.mean(1) if reduce == "mean" else views.max(1)
        assert out[name].shape == (2, views.shape[2])
        assert rel_err(torch.from_numpy(out[name]), torch.from_numpy(want[good])) < FP32_TOL, name


@pytest.mark.slow
def test_extract_10crop_end_to_end(tmp_path, photos):
    src = tmp_path / "src"
    src.mkdir()
    for p in photos[:3]:
        os.symlink(p, src / os.path.basename(p))
    out = tmp_path / "out"
    fastfeat.extract(
        str(src), str(out), model="caffenet", weights="random:3", layers=["relu7"], precision="fp32",
        dtype="float32", augment="10crop", progress=False,
    )  # fmt: skip
    table = pq.read_table(out / "part-00000.parquet")
    meta = json.loads(table.schema.metadata[b"fastfeat"])
    assert meta["augment"]["views"] == "10crop" and meta["augment"]["reduce"] == "mean"
    assert len(meta["augment"]["crops"]) == 10
    weights = load_weights(get_model("caffenet"), "random:3").tensors
    net = reference_model("caffenet", weights)
    got = np.array(table.column("relu7").to_pylist(), np.float32)
    for row, file in enumerate(table.column("id").to_pylist()):
        with torch.no_grad():
            feats = net(reference_views(str(src / file), "caffenet").permute(0, 3, 1, 2).contiguous())["relu7"]
        want = feats.numpy().mean(0)
        assert rel_err(torch.from_numpy(got[row]), torch.from_numpy(want)) < E2E_TOL, file
        # Not the centre crop alone: the 10-view mean is 13-16% away from it on these photos.
        assert rel_err(torch.from_numpy(got[row]), feats[0]) > 0.05


def test_bad_image_in_a_batch_of_views(tmp_path, corrupt_dataset, clean_copy):
    """The one-by-one decode path with views: good images keep bit-identical features."""
    args = dict(model="caffenet", weights="random:0", layers=["relu7"], batch_size=8, augment="5crop", progress=False)
    fastfeat.extract(corrupt_dataset, str(tmp_path / "bad"), **args)
    fastfeat.extract(clean_copy, str(tmp_path / "clean"), **args)
    bad = pq.read_table(tmp_path / "bad" / "part-00000.parquet")
    clean = pq.read_table(tmp_path / "clean" / "part-00000.parquet")
    assert bad.column("id").to_pylist() == clean.column("id").to_pylist() and len(bad) == 4
    assert bad.column("relu7").equals(clean.column("relu7"))


def test_mean_image_is_cropped_with_each_view(tmp_path, photos):
    rng = np.random.default_rng(0)
    mean = rng.uniform(90, 130, size=(3, 256, 256)).astype(np.float32)  # Caffe's CHW mean image
    np.save(tmp_path / "mean.npy", mean)
    pre, views = get_model("caffenet").preprocess, get_views("10crop")
    per_view = augmented_mean(str(tmp_path / "mean.npy"), pre, views)
    with_mean = _decode_views("caffenet", photos[:2], mean_image=per_view)
    plain = _decode_views("caffenet", photos[:2], mean_image=np.zeros(3, np.float32))
    hwc, far = mean.transpose(1, 2, 0), 256 - 227
    crops = [hwc[y : y + 227, x : x + 227] for y, x in ((14, 14), (0, 0), (0, far), (far, 0), (far, far))]
    want = torch.from_numpy(np.stack(crops + [c[:, ::-1] for c in crops]))  # a mirrored view's mean is mirrored
    torch.testing.assert_close(with_mean.reshape(2, 10, 227, 227, 3), plain.reshape(2, 10, 227, 227, 3) - want,
                               rtol=0, atol=1e-4)  # fmt: skip


@pytest.mark.slow
def test_metadata_and_resume_mismatch(tmp_path, photos, capsys):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(photos[0], src / os.path.basename(photos[0]))
    out = str(tmp_path / "out")
    base = ["extract", str(src), "--out", out, "--weights", "random:0", "--layers", "relu7", "--no-progress"]
    assert main([*base, "--augment", "center+flip", "--augment-reduce", "max"]) == 0
    meta = json.loads(pq.read_schema(os.path.join(out, "part-00000.parquet")).metadata[b"fastfeat"])
    assert meta["augment"] == {"views": "center+flip", "crops": ["center", "center+mirror"], "reduce": "max"}
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["config"]["metadata"]["augment"]["views"] == "center+flip"
    capsys.readouterr()
    assert main([*base, "--augment", "center+flip", "--augment-reduce", "mean"]) == 2
    assert "augment.reduce: max → mean" in capsys.readouterr().err
    assert main([*base, "--augment", "center+flip", "--augment-reduce", "max"]) == 0  # the same run: up to date


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--augment", "7crop"], "unknown --augment '7crop'"),
        (["--augment", "5crop", "--augment-reduce", "median"], "unknown --augment-reduce 'median'"),
        # A mean file with a mean/std model is refused whatever the views (fastfeat.means.check_mean_file).
        (["--augment", "5crop", "--model", "alexnet", "--mean-file", "MEAN"], "--mean-file is a Caffe-style mean"),
    ],
)
def test_bad_augment_arguments_write_nothing(tmp_path, photos, capsys, extra, message):
    np.save(tmp_path / "mean.npy", np.full((3, 256, 256), 110, np.float32))
    extra = [str(tmp_path / "mean.npy") if e == "MEAN" else e for e in extra]
    (tmp_path / "src").mkdir()
    os.symlink(photos[0], tmp_path / "src" / os.path.basename(photos[0]))
    out = tmp_path / "out"
    assert main(["extract", str(tmp_path / "src"), "--out", str(out), "--weights", "random:0", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
