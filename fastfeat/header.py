"""What the read stage learns from an image before any decoding: its upright size from the header,
the refusals (too many pixels, an aspect ratio too extreme) and the resize/crop geometry of a
preprocessing.  Imports neither torch nor DALI (the read stage runs without them)."""

from __future__ import annotations

import io
import warnings

import numpy as np

from .faults import CORRUPT, NOT_IMAGE, TOO_LARGE, Problem, ReadFault, image_cause
from .models import Preprocess
from .sources.items import Item
from .sources.reader import ItemReader

DEFAULT_MAX_PIXELS = 100_000_000  # refuse decompression bombs above 100 megapixels (configurable)
JPEG_MAGIC = b"\xff\xd8"
EXIF_ORIENTATION = 0x0112  # values 5-8 rotate by 90 degrees: width and height swap


def geometry(pre: Preprocess, width: int, height: int) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, crop_top, crop_left) for an upright width×height image.

    caffe: warp to resize×resize; crop offset (resize - crop) // 2 as Caffe's
    DataTransformer (integer division: 14 for 256 -> 227).
    torchvision: shorter side to ``resize``, longer side int(resize * long / short)
    (truncated, as torchvision's Resize); offset int(round((size - crop) / 2)) as
    its CenterCrop (Python's round: halves go to even).
    """
    crop = pre.crop
    if pre.style == "caffe":
        rh = rw = pre.resize
        top = left = (pre.resize - crop) // 2
    else:
        short, long = min(width, height), max(width, height)
        new_long = int(pre.resize * long / short)
        rh, rw = (pre.resize, new_long) if height <= width else (new_long, pre.resize)
        top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
    return rh, rw, top, left


def read_image(
    item: Item, max_pixels: int, reader: ItemReader | None = None, pre: Preprocess | None = None
) -> tuple[np.ndarray | None, tuple[int, int], Problem | None]:
    """Bytes and upright (width, height) of one image, or a Problem (stage, message, cause) of its own.

    Refused from the header alone, before any decoding: more than ``max_pixels`` pixels, or
    (given the preprocessing ``pre``) an aspect ratio so extreme that the resized image would be.
    A read that failed for a reason that is not the image's (the reader retried transient ones) raises
    :class:`~fastfeat.faults.ReadFault`: it is never a Problem.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        data = (reader or ItemReader()).read(item)
    except ReadFault:
        raise
    except OSError as exc:
        cause = image_cause(exc)
        if cause is None:  # a reader that does not classify (a caller's own): not the image's, not recorded
            raise ReadFault(exc.strerror or str(exc), 1) from exc
        return None, (0, 0), Problem("read", exc.strerror or str(exc), cause)
    if not data:
        return None, (0, 0), Problem("read", "empty file", NOT_IMAGE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                # DALI applies the EXIF orientation: report and resize by the upright size (any format:
                # phone JPEGs are often "MPO" to Pillow).
                if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                    width, height = height, width
    except Image.DecompressionBombError:
        return (
            None,
            (0, 0),
            Problem("header", f"image too large: over --max-pixels {max_pixels} (decompression bomb?)", TOO_LARGE),
        )
    except UnidentifiedImageError:
        return None, (0, 0), Problem("header", "not a recognised image format", NOT_IMAGE)
    except (OSError, SyntaxError, ValueError) as exc:
        return None, (0, 0), Problem("header", f"unreadable image header: {exc}", CORRUPT)
    if width * height > max_pixels:
        return (
            None,
            (width, height),
            Problem("header", f"image too large: {width}x{height} over --max-pixels {max_pixels}", TOO_LARGE),
        )
    if pre is not None:
        rh, rw, _, _ = geometry(pre, width, height)
        if rh * rw > max_pixels:
            message = f"aspect ratio too extreme: {width}x{height} resizes to {rw}x{rh}, over --max-pixels {max_pixels}"
            return None, (width, height), Problem("header", message, TOO_LARGE)
    return np.frombuffer(data, dtype=np.uint8), (width, height), None
