"""``--mean-file``: a Caffe-style mean (0-255 pixel units, in the model's channel order, subtracted with no
std division) read from ``.npy``.  Imports neither torch nor DALI.

Accepted shapes (:data:`MEAN_SHAPES`): ``(3,)``, one mean per channel; ``(3, S, S)``, a channels-first
mean image as Caffe's ``ilsvrc_2012_mean.npy``; ``(S, S, 3)``, a channels-last one; a mean image is square
with ``S`` at least the model's crop and is centre-cropped like the image.  Only Caffe-style models take
one (:func:`check_mean_file`): a torchvision-style model (alexnet, vgg16) normalises with the ImageNet
mean and std, and a Caffe mean has no defined place in that.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import ConfigError, FastfeatError

MEAN_SHAPES = "(3,), (3,S,S) or (S,S,3)"  # also in the --mean-file help (fastfeat.cli)


class PreprocessError(FastfeatError):
    pass


def load_mean(mean_file: str, crop: int, resize: int) -> np.ndarray:
    """A .npy mean as an HWC float32 array of shape (crop, crop, 3) or (3,) in the model's channel order.

    Accepts Caffe's CHW mean image (3×256×256 as ``ilsvrc_2012_mean.npy``; centre-cropped
    to the crop like the image), an HWC image, or a per-channel vector of 3.
    """
    if not os.path.isfile(mean_file):
        raise PreprocessError(f"mean file not found: {mean_file}")
    try:
        mean = np.load(mean_file, allow_pickle=False).astype(np.float32)
    except Exception as exc:  # numpy raises several types for a non-.npy file
        raise PreprocessError(f"cannot read mean file {mean_file}: {exc}") from None
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
    only a Caffe-style model subtracts a mean and divides by nothing."""
    if mean_file and preprocess.style != "caffe":
        raise ConfigError(
            f"--mean-file is a Caffe-style mean (0-255 pixels, no std), but model {model!r} normalises with the "
            "ImageNet mean and std (torchvision style): drop --mean-file, or use a Caffe-style model (caffenet)"
        )
