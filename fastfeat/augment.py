"""Test-time augmentation (``extract --augment``): which crops of an image the network sees, and how
their features become one row per image (``--augment-reduce``).

A view is a crop of the *resized* image, the same image the plain centre crop comes from, optionally
mirrored (flipped left-right after cropping, as Caffe's ``oversample`` and torchvision's ``TenCrop``
do).  The decoder takes every view in the same DALI pipeline from one decode and one resize
(``fastfeat.decode.Decoder``), so an image costs one decode whatever the number of views; the
forward pass then sees ``views`` rows per image, image-major (rows i·V … i·V+V−1 are image i's).

    center       1 view: the centre crop (the default, and DeCAF's)
    flip         1 view: the mirrored centre crop
    center+flip  2 views
    5crop        5 views: centre and the four corners
    10crop       10 views: 5crop and the mirror of each (Chatfield et al.'s "C+F")

The corners are flush with the resized image's edges; the centre is the model's own centre crop
(``decode.geometry``: Caffe's and torchvision's integer offsets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .means import load_mean

DEFAULT_AUGMENT = "center"
REDUCES = ("mean", "max")


@dataclass(frozen=True)
class View:
    name: str
    anchor: str  # "center", or a corner: "top-left", "top-right", "bottom-left", "bottom-right"
    mirror: bool


_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
_FIVE = (View("center", "center", False), *(View(c, c, False) for c in _CORNERS))
_MIRRORED = tuple(View(v.name + "+mirror", v.anchor, True) for v in _FIVE)
AUGMENTS: dict[str, tuple[View, ...]] = {
    "center": _FIVE[:1],
    "flip": _MIRRORED[:1],
    "center+flip": (_FIVE[0], _MIRRORED[0]),
    "5crop": _FIVE,
    "10crop": _FIVE + _MIRRORED,
}


def get_views(augment: str) -> tuple[View, ...]:
    try:
        return AUGMENTS[augment]
    except KeyError:
        raise ConfigError(f"unknown --augment {augment!r}; choose from {', '.join(AUGMENTS)}") from None


def check_augment(augment: str, reduce: str) -> None:
    get_views(augment)
    if reduce not in REDUCES:
        raise ConfigError(f"unknown --augment-reduce {reduce!r}; choose from {', '.join(REDUCES)}")


def crop_position(view: View, geom: tuple[int, int, int, int], crop: int) -> tuple[int, int]:
    """(top, left) of the view's crop in the resized image; ``geom`` is decode.geometry's
    (resized_h, resized_w, centre_top, centre_left)."""
    rh, rw, top, left = geom
    if view.anchor == "center":
        return top, left
    return (0 if view.anchor.startswith("top") else rh - crop), (0 if view.anchor.endswith("left") else rw - crop)


def view_means(full_mean: np.ndarray, views: tuple[View, ...], crop: int) -> np.ndarray:
    """Each view's crop of a mean image given at the resized size (Caffe style: every image is warped
    to the mean's size), mirrored with its view: [views, crop, crop, 3]."""
    size = full_mean.shape[0]
    geom = (size, size, (size - crop) // 2, (size - crop) // 2)  # Caffe's centre offset, as decode.geometry
    out = []
    for view in views:
        top, left = crop_position(view, geom, crop)
        m = full_mean[top : top + crop, left : left + crop]
        out.append(m[:, ::-1] if view.mirror else m)
    return np.ascontiguousarray(np.stack(out))


def reduce_views(acts, views: int, reduce: str):
    """[images·views, ...] activations (image-major) -> [images, C·H·W] in float32, the views' mean or max."""
    a = acts.reshape(acts.shape[0] // views, views, -1).float()
    return a.mean(1) if reduce == "mean" else a.amax(1)


def augment_metadata(augment: str, reduce: str) -> dict:
    """What a shard's metadata says about the views (reduce is None for a single view)."""
    views = get_views(augment)
    return {"views": augment, "crops": [v.name for v in views], "reduce": reduce if len(views) > 1 else None}


def augmented_mean(mean_file: str, pre, views: tuple[View, ...]) -> np.ndarray:
    """``--mean-file`` under augmentation: one mean crop per view, [views, crop, crop, 3] (a per-channel
    mean, shape (3,), is the same for every view and is returned as it is)."""
    full = load_mean(mean_file, pre.resize, pre.resize, pre.channel_order)
    if full.shape == (3,):
        return full
    if pre.style != "caffe":
        # Only a Caffe-style warp gives every image the mean image's size, so a corner of the mean
        # is the same corner of every image; after a shorter-side resize it is not.
        raise ConfigError("--mean-file with a mean image and --augment needs a caffe-style model (e.g. caffenet)")
    return view_means(full, views, pre.crop)
