"""``--mean-file``: a mean image or per-channel mean read from ``.npy``.  Imports neither torch nor DALI."""

from __future__ import annotations

import os

import numpy as np


class PreprocessError(ValueError):
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
    if mean.shape == (3,):
        return mean
    if mean.ndim == 3 and mean.shape[0] == 3 and mean.shape[2] != 3:
        mean = mean.transpose(1, 2, 0)
    if mean.ndim != 3 or mean.shape[2] != 3 or mean.shape[0] != mean.shape[1] or mean.shape[0] < crop:
        raise PreprocessError(
            f"mean file {mean_file}: expected shape (3,), (3,S,S) or (S,S,3) with S >= {crop}, got {mean.shape}"
        )
    off = (mean.shape[0] - crop) // 2
    return np.ascontiguousarray(mean[off : off + crop, off : off + crop])
