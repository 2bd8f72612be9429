"""DALI preprocessing against an independent PIL/torch(vision) reference."""

import numpy as np
import pytest
import torch
from helpers import jpeg_bytes
from PIL import Image
from reference import reference_preprocess, rel_err

from fastfeat.decode import Decoder, PreprocessError, geometry, load_mean, read_image
from fastfeat.models import DEFAULT_DECODE, get_model, list_models
from fastfeat.sources import Item

# DALI's bilinear resampler and torch's differ in rounding only: measured 0.3-0.8% per photo.
PREPROCESS_TOL = 0.012


def _decode(model, paths, batch_size=8, mean_image=None, mode=DEFAULT_DECODE):
    spec = get_model(model)
    dec = Decoder(spec.preprocess, batch_size, torch.device("cpu"), mean_image=mean_image, mode=mode)
    read = [read_image(Item(p, p, None), 10**9) for p in paths]
    batch, bad, _ = dec.decode([r[0] for r in read], [r[1] for r in read])
    return batch, bad


@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("model", list_models())
def test_dali_matches_reference(model, mode, photos):
    batch, bad = _decode(model, photos, mode=mode)
    assert bad == {}
    crop = get_model(model).preprocess.crop
    assert batch.shape == (len(photos), crop, crop, 3) and batch.dtype == torch.float32
    for i, p in enumerate(photos):
        err = rel_err(batch[i], reference_preprocess(p, model)[0])
        assert err < PREPROCESS_TOL, (p, err)


def test_geometry_follows_caffe_and_torchvision_integer_rules():
    caffe, tv = get_model("caffenet").preprocess, get_model("alexnet").preprocess
    assert geometry(caffe, 640, 427) == (256, 256, 14, 14)  # Caffe: (256 - 227) // 2
    assert geometry(tv, 451, 300) == (256, 384, 16, 80)  # int(256 * 451 / 300) = 384
    assert geometry(tv, 300, 451) == (384, 256, 80, 16)
    assert geometry(tv, 449, 256) == (256, 449, 16, 112)  # round(112.5) = 112 (half to even)


def test_greyscale_and_alpha_become_three_channels(tmp_path, photos):
    img = Image.open(photos[0]).convert("RGB")
    grey = tmp_path / "grey.jpg"
    grey.write_bytes(jpeg_bytes(img.convert("L")))
    rgba = tmp_path / "rgba.png"
    img.convert("RGBA").save(rgba)
    batch, bad = _decode("alexnet", [str(grey), str(rgba)])
    assert bad == {}
    g = batch[0]
    # A grey image normalised per channel: undo the normalisation and all three channels agree.
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    std = torch.tensor([0.229, 0.224, 0.225]) * 255
    pixels = g * std + mean
    assert (pixels[..., 0] - pixels[..., 1]).abs().max() < 0.01
    assert rel_err(batch[1], reference_preprocess(photos[0], "alexnet")[0]) < PREPROCESS_TOL


def test_corrupt_sample_does_not_spoil_its_batch(photos):
    jpg = next(p for p in photos if p.endswith(".jpg"))
    data = open(jpg, "rb").read()
    spec = get_model("caffenet")
    dec = Decoder(spec.preprocess, 4, torch.device("cpu"))
    good = [np.fromfile(p, np.uint8) for p in photos[:3]]
    sizes = [read_image(Item(p, p, None), 10**9)[1] for p in photos[:3]]
    clean, _, _ = dec.decode(good, sizes)
    truncated = np.frombuffer(data[: len(data) // 3], np.uint8)
    batch, bad, _ = dec.decode([good[0], truncated, good[1], good[2]], [sizes[0], (640, 427), sizes[1], sizes[2]])
    assert list(bad) == [1] and bad[1]
    assert torch.equal(batch[1], torch.zeros_like(batch[1]))
    assert torch.equal(batch[[0, 2, 3]], clean)  # bit-identical to the clean batch
    again, bad, _ = dec.decode(good, sizes)  # the decoder keeps working afterwards
    assert bad == {} and torch.equal(again, clean)


def test_mean_image_file(tmp_path, photos):
    rng = np.random.default_rng(0)
    mean = rng.uniform(90, 130, size=(3, 256, 256)).astype(np.float32)  # Caffe's CHW mean image layout
    np.save(tmp_path / "mean.npy", mean)
    m = load_mean(str(tmp_path / "mean.npy"), 227, 256)
    assert m.shape == (227, 227, 3)
    np.testing.assert_array_equal(m, mean.transpose(1, 2, 0)[14:241, 14:241])
    with_image, _ = _decode("caffenet", photos[:2], mean_image=m)
    plain, _ = _decode("caffenet", photos[:2], mean_image=np.zeros(3, np.float32))
    torch.testing.assert_close(with_image, plain - torch.from_numpy(m), rtol=0, atol=1e-4)


def test_bad_mean_file(tmp_path):
    np.save(tmp_path / "m.npy", np.zeros((3, 100, 100), np.float32))
    with pytest.raises(PreprocessError, match=r"shape \(3, 100, 100\); expected"):
        load_mean(str(tmp_path / "m.npy"), 227, 256)
    with pytest.raises(PreprocessError, match="not found"):
        load_mean(str(tmp_path / "nope.npy"), 227, 256)


def test_resource_failures_are_not_taken_for_bad_images():
    from fastfeat.decode import _is_sample_error

    decode_failure = "Error in CPU operator `nvidia.dali.fn.decoders.image`,\nencountered:\nFailed to decode sample #0"
    assert _is_sample_error(decode_failure, raw=False)
    assert not _is_sample_error(decode_failure + "\nstd::bad_alloc", raw=False)
    assert not _is_sample_error("CUDA error: out of memory in fn.resize", raw=False)
    assert not _is_sample_error("Error in CPU operator `nvidia.dali.fn.resize`", raw=False)


# fast resizes only the crop window: the same sample grid, uint8 rounding apart (measured at most
# 5.5e-4 on these photos and 5e-4 on ImageNet-like ones, benchmarks/results/decode_modes_cpu.json).
WINDOW_TOL = 2e-3
# dct: libjpeg-turbo's DCT-domain downscale before the resize: 2.3% on the upscaled photo below (on
# noisy 2-12 MP photos 5-15%, same file), far below a wrong orientation (147%).
DCT_TOL = 0.05


@pytest.mark.parametrize("model", ["caffenet", "alexnet"])
def test_fast_decode_equals_exact_up_to_rounding(model, photos):
    exact, _ = _decode(model, photos, mode="exact")
    fast, _ = _decode(model, photos, mode="fast")
    for i in range(len(photos)):
        assert rel_err(fast[i], exact[i]) < WINDOW_TOL, photos[i]


def test_dct_decodes_large_jpegs_scaled_and_upright(tmp_path, photos):
    """A JPEG ≥ 2× the target (also one stored sideways with EXIF orientation 6) is decoded scaled;
    a small one is not; every result stays close to the exact decode, in the same orientation."""
    spec = get_model("alexnet")
    big = Image.open(photos[0]).convert("RGB").resize((1600, 1200), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: displayed after a 90-degree turn
    files = {"big": jpeg_bytes(big), "sideways": jpeg_bytes(big.transpose(Image.Transpose.ROTATE_90), exif=exif),
             "small": open(photos[1], "rb").read()}  # fmt: skip
    paths = []
    for name, data in files.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
        paths.append(str(tmp_path / f"{name}.jpg"))
    read = [read_image(Item(p, p, None), 10**9, pre=spec.preprocess) for p in paths]
    encoded, sizes = [r[0] for r in read], [r[1] for r in read]
    dct = Decoder(spec.preprocess, 4, torch.device("cpu"), mode="dct")
    geoms = [geometry(spec.preprocess, w, h) for w, h in sizes]
    scaled = dct._decode_scaled(encoded, sizes, geoms)
    assert sorted(scaled) == [0, 1]  # the two big ones, not the small one
    assert scaled[0].shape[:2] == (300, 400)  # 1/4 scale: the smallest that keeps >= 256 x 341
    exact, _, _ = Decoder(spec.preprocess, 4, torch.device("cpu"), mode="exact").decode(encoded, sizes)
    got, bad, _ = dct.decode(encoded, sizes)
    assert bad == {}
    for i in range(3):
        assert rel_err(got[i], exact[i]) < DCT_TOL, paths[i]
    assert rel_err(got[1], exact[0]) < DCT_TOL  # the sideways file shows the same upright picture
    assert rel_err(got[1], exact[0].flip(0)) > 10 * DCT_TOL  # and that check can fail


def test_unknown_decode_mode_is_refused():
    with pytest.raises(PreprocessError, match="unknown decode mode"):
        Decoder(get_model("caffenet").preprocess, 2, torch.device("cpu"), mode="quick")
