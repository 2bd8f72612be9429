"""``--mean-file``: a Caffe-style mean (0-255 pixel units, in the model's channel order, subtracted with no
std division) read from ``.npy``.  Imports neither torch nor DALI.

Accepted shapes (:data:`MEAN_SHAPES`): ``(3,)``, one mean per channel; ``(3, S, S)``, a channels-first
mean image as Caffe's ``ilsvrc_2012_mean.npy``; ``(S, S, 3)``, a channels-last one; a mean image is square
with ``S`` at least the model's crop and is centre-cropped like the image.  Only Caffe-style models take
one (:func:`check_mean_file`): a torchvision-style model (alexnet, vgg16) normalises with the ImageNet
mean and std, and a Caffe mean has no defined place in that.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .errors import ConfigError, FastfeatError

MEAN_SHAPES = "(3,), (3,S,S) or (S,S,3)"  # also in the --mean-file help (fastfeat.cli)


class PreprocessError(FastfeatError):
    pass


def load_mean(mean_file: str, crop: int, resize: int, channel_order: str = "BGR") -> np.ndarray:
    """A mean as an HWC float32 array of shape (crop, crop, 3) or (3,) in the model's channel order.

    ``.npy``: Caffe's CHW mean image (3×256×256 as ``ilsvrc_2012_mean.npy``), an HWC image or a
    per-channel vector of 3, already in the model's channel order.  ``.binaryproto``: a Caffe BlobProto
    (``VGG_mean.binaryproto``, ``imagenet_mean.binaryproto``), BGR as Caffe writes it.  ``.mat``: the
    ``averageImage`` of a MatConvNet model file (fastfeat.matconvnet), RGB.  The last two are turned into
    ``channel_order``.  An image is centre-cropped to the crop like the image.
    """
    if not os.path.isfile(mean_file):
        raise PreprocessError(f"mean file not found: {mean_file}")
    ext = os.path.splitext(mean_file)[1].lower()
    try:
        if ext == ".binaryproto":
            from .caffemodel import read_blobproto

            with open(mean_file, "rb") as f:
                mean = read_blobproto(f.read()).astype(np.float32)
            mean = mean.reshape(mean.shape[-3:]) if mean.ndim >= 3 and math.prod(mean.shape[:-3]) == 1 else mean
            mean = mean if channel_order == "BGR" else mean[::-1]  # Caffe's blobs are BGR, CHW
        elif ext == ".mat":
            from .matconvnet import read_matconvnet_mean

            mean = read_matconvnet_mean(mean_file)  # RGB, HWC or (3,)
            mean = mean if channel_order == "RGB" else mean[..., ::-1]
        else:
            mean = np.load(mean_file, allow_pickle=False).astype(np.float32)
    except PreprocessError:
        raise
    except Exception as exc:  # numpy/scipy/our readers raise several types for a bad file
        raise PreprocessError(f"cannot read mean file {mean_file}: {str(exc).splitlines()[0]}") from None
    mean = np.ascontiguousarray(mean, dtype=np.float32)
    given = mean.shape  # reported as saved, before a channels-first image is transposed
    if mean.shape == (3,):
        return mean
    if mean.ndim == 3 and mean.shape[0] == 3 and mean.shape[2] != 3:
        mean = mean.transpose(1, 2, 0)
    if mean.ndim != 3 or mean.shape[2] != 3 or mean.shape[0] != mean.shape[1] or mean.shape[0] < crop:
        raise PreprocessError(
            f"mean file {mean_file}: shape {given}; expected {MEAN_SHAPES} with S >= {crop} (a per-channel mean, "
            "or a square mean image channels-first as Caffe's or channels-last)"
        )
    off = (mean.shape[0] - crop) // 2
    return np.ascontiguousarray(mean[off : off + crop, off : off + crop])


def check_mean_file(mean_file: str | None, preprocess, model: str) -> None:
    """ConfigError when ``model``'s preprocessing (a fastfeat.models.Preprocess) cannot take a mean file:
    only a Caffe-style model (CaffeNet, CNN-F/M/S: 0-255 pixels, a mean subtracted, no std) can take one;
    a model that divides by a std (torchvision's, OverFeat) has its normalisation fixed."""
    if mean_file and any(s != 1.0 for s in preprocess.std):
        raise ConfigError(
            f"--mean-file is a Caffe-style mean (0-255 pixels, no std), but model {model!r} normalises with a "
            "mean and std of its own: drop --mean-file, or use a Caffe-style model (caffenet, cnn-f, cnn-m, cnn-s)"
        )
