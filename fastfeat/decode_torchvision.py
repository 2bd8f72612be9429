"""The second decoder (``--decoder torchvision``): JPEGs decoded in batches by
``torchvision.io.decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on the CPU), then resized, cropped and
normalised by torch on the same device, with DALI's geometry (fastfeat.header.geometry).

Same interface and contract as :class:`fastfeat.decode.Decoder`: ``decode(encoded, sizes)`` returns
(NHWC float32 batch, {bad index: message}, {warned index: message}), a bad sample keeps a zero row.

* Geometry: the resize target (rh, rw) and crop offsets are DALI's path's, computed on the host from
  the header.  The resize is ``F.interpolate(mode="bilinear", align_corners=False)``, antialiased for
  the torchvision style and plain for the caffe style (as DALI's ``antialias=``), rounded to uint8 as
  DALI's resize output is, then cropped, mirrored and normalised as ``crop_mirror_normalize``.  The
  whole image is resized and then cropped (``--decode exact``'s arithmetic; ``fast`` samples the same
  positions, so both give these pixels); ``--decode dct`` is refused (argument check).
* Measured against DALI's CPU path on the sample photos (tests/test_decode_torchvision.py, numbers in
  docs/decoders.md): pixels differ by the two resamplers' filter weights and rounding.
* EXIF orientation is applied here for both devices (nvJPEG's batched decode has none), read from the
  header only when the file carries an Exif block.
* Failures: a batch nvJPEG/libjpeg refuses is decoded one image at a time; an image that still fails,
  and every non-JPEG file (PNG, GIF...), goes to Pillow, and only when Pillow fails too is it an error
  ("<decoder's message> (Pillow: ...)"), exactly as in DALI's path.  A failure whose text names the
  machine (CUDA, memory) propagates and fails the run.
* nvJPEG synchronises its stream: the decoder runs on its own CUDA stream (and the runner's decode
  thread), so the forward pass on another stream is not held up by it.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .augment import AUGMENTS, DEFAULT_AUGMENT, View
from .console import captured_native_stderr
from .decode import _MACHINE_ERRORS
from .header import EXIF_ORIENTATION, JPEG_MAGIC, geometry
from .means import PreprocessError
from .models import DECODE_MODES, DEFAULT_DECODE, Preprocess

# torchvision 0.2x warns on every decode_jpeg call that its decoders may move to torchcodec: not ours to act on.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io\.image")

# torchvision prefixes its errors with the C++ function, file and line: "decode_jpeg, /path/x.cpp:171, ".
_SOURCE_PREFIX = re.compile(r"^\w+, \S+:\d+, ")

# Pillow's exif_transpose, as tensor ops on [C, H, W]: orientation -> function.
_ORIENT = {
    2: lambda t: t.flip(-1),
    3: lambda t: t.flip(-1, -2),
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-1, -2),
    6: lambda t: torch.rot90(t, -1, (-2, -1)),
    7: lambda t: t.transpose(-1, -2).flip(-1, -2),
    8: lambda t: torch.rot90(t, 1, (-2, -1)),
}


def exif_orientation(sample: np.ndarray) -> int:
    """The EXIF orientation of an encoded image (1 when it has none); Pillow reads the header only."""
    if b"Exif" not in sample[:65536].tobytes():
        return 1
    from PIL import Image

    try:
        with Image.open(io.BytesIO(sample.tobytes())) as im:
            return int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # an unreadable Exif block: the image is used as stored, as Pillow's exif_transpose does
        return 1


def _is_machine_error(message: str) -> bool:
    lower = message.lower()
    return any(s in lower for s in _MACHINE_ERRORS)


class TorchvisionDecoder:
    """torchvision/nvJPEG decode + torch resize/crop/normalise into an NHWC float32 torch batch."""

    name = "torchvision"

    def __init__(
        self,
        pre: Preprocess,
        batch_size: int,
        device: torch.device,
        num_threads: int | None = None,
        mean_image: np.ndarray | None = None,
        views: tuple[View, ...] = AUGMENTS[DEFAULT_AUGMENT],
        hw_decoder_load: float = 0.0,
        mode: str = DEFAULT_DECODE,
    ):
        if mode not in DECODE_MODES or mode == "dct":
            raise PreprocessError(
                f"decode mode {mode!r} is not available with the torchvision decoder; use fast or exact"
            )
        if hw_decoder_load:
            raise PreprocessError("hw_decoder_load is DALI's: the torchvision decoder has no hardware-engine share")
        import torchvision.io  # noqa: F401  (registers the image ops)

        self.pre, self.batch_size, self.device, self.views = pre, batch_size, device, views
        self.num_threads = num_threads  # libjpeg-turbo decodes one image per call: unused, kept for the interface
        mean = np.asarray(pre.mean, np.float32) if mean_image is None else np.asarray(mean_image, np.float32)
        if mean.shape == (3,):
            self.mean = torch.tensor(mean, device=device)  # broadcast over [..., 3]
        else:
            self.mean = torch.from_numpy(mean).to(device)  # [crop, crop, 3] or [views, crop, crop, 3]
        self.std = torch.tensor(pre.std, dtype=torch.float32, device=device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    # -- decoding to uint8 [3, H, W] pixels on the device, in RGB --------------------------------------------
    def _decode_jpegs(self, samples: list[np.ndarray]) -> list[torch.Tensor]:
        """decode_jpeg on a list of JPEGs (a RuntimeError for the batch when one is bad)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.from_numpy(np.array(s, copy=True)) for s in samples]  # writable copies of read-only bytes
        out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
        return list(out)

    def _jpegs(self, samples: list[np.ndarray]) -> tuple[list[torch.Tensor | None], dict[int, str], dict[int, str]]:
        """(pixels or None, {failed: message}, {warned: message}) of JPEG samples."""
        try:
            with captured_native_stderr() as said:
                pixels: list[torch.Tensor | None] = list(self._decode_jpegs(samples))
            if not said[0]:
                return pixels, {}, {}
        except RuntimeError as exc:
            if _is_machine_error(str(exc)):
                raise
        # A failure or a warning somewhere in the batch: one at a time, to know whose it was.
        pixels, failed, notes = [], {}, {}
        for i, sample in enumerate(samples):
            try:
                with captured_native_stderr() as said:
                    (px,) = self._decode_jpegs([sample])
                pixels.append(px)
                if said[0]:
                    notes[i] = said[0]
            except RuntimeError as exc:
                if _is_machine_error(str(exc)):
                    raise
                pixels.append(None)
                failed[i] = _SOURCE_PREFIX.sub("", " ".join(str(exc).split()))[:500]
        return pixels, failed, notes

    def _pillow(self, sample: np.ndarray, message: str) -> tuple[torch.Tensor | None, str]:
        """Pillow's first frame, EXIF-transposed, in RGB, as [3, H, W] uint8 on the device; or (None, reason)
        (a truncated JPEG too: Pillow refuses it, as in DALI's path)."""
        from PIL import Image, ImageOps

        try:
            with Image.open(io.BytesIO(sample.tobytes())) as im:
                im.seek(0)
                pixels = np.array(ImageOps.exif_transpose(im).convert("RGB"), copy=True)
        except MemoryError:
            raise
        except Exception as exc:  # Pillow raises many types for a bad file; we only want the text
            return None, f"{message} (Pillow: {type(exc).__name__}: {exc})"
        return torch.from_numpy(pixels).permute(2, 0, 1).to(self.device), ""

    # -- geometry ---------------------------------------------------------------------------------------------
    def _crops(self, pixels: torch.Tensor, geom: tuple[int, int, int, int]) -> torch.Tensor:
        """[views, crop, crop, 3] float32 pixel values (0..255, not normalised) of one [3, H, W] uint8 image."""
        rh, rw, top, left = geom
        crop = self.pre.crop
        x = pixels.unsqueeze(0).float()
        if x.shape[-2:] != (rh, rw):
            x = F.interpolate(
                x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=self.pre.style != "caffe"
            )
            x = x.round_().clamp_(0, 255)  # DALI's resize writes uint8
        x = x[0]
        rows = []
        for v in self.views:
            if v.anchor == "center":
                row0, col0 = top, left
            else:  # corners, as DALI's crop_pos 0 or 1 (fastfeat.augment)
                row0 = rh - crop if v.anchor.startswith("bottom") else 0
                col0 = rw - crop if v.anchor.endswith("right") else 0
            c = x[:, row0 : row0 + crop, col0 : col0 + crop]
            rows.append(c.flip(-1) if v.mirror else c)
        out = torch.stack(rows).permute(0, 2, 3, 1)  # [views, crop, crop, 3] RGB
        return out.flip(-1) if self.pre.channel_order == "BGR" else out

    # -- the batch --------------------------------------------------------------------------------------------
    def close(self) -> None:
        """As ``Decoder.close``: nothing to release here (no thread pool; the CUDA stream goes with the object)."""

    def decode(
        self, encoded: list[np.ndarray], sizes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor | None, dict[int, str], dict[int, str]]:
        """``_decode`` on the decoder's own CUDA stream; the batch is complete when it is returned."""
        if self.stream is None:
            return self._decode(encoded, sizes)
        with torch.cuda.stream(self.stream):
            result = self._decode(encoded, sizes)
        self.stream.synchronize()  # another thread's stream (the forward pass) reads the batch next
        return result

    def _decode(self, encoded, sizes):
        if not encoded:
            return None, {}, {}
        n = len(encoded)
        geoms = [geometry(self.pre, w, h) for w, h in sizes]
        pixels: list[torch.Tensor | None] = [None] * n
        bad: dict[int, str] = {}
        notes: dict[int, str] = {}
        jpegs = [i for i, e in enumerate(encoded) if e[:2].tobytes() == JPEG_MAGIC]
        failed: dict[int, str] = {}
        if jpegs:
            decoded, jpeg_failed, jpeg_notes = self._jpegs([encoded[i] for i in jpegs])
            for k, i in enumerate(jpegs):
                if decoded[k] is not None:
                    orient = exif_orientation(encoded[i])
                    pixels[i] = _ORIENT[orient](decoded[k]) if orient in _ORIENT else decoded[k]
            failed = {jpegs[k]: m for k, m in jpeg_failed.items()}
            notes = {jpegs[k]: m for k, m in jpeg_notes.items()}
        jpeg_set = set(jpegs)
        for i in range(n):
            if pixels[i] is None:
                message = failed.get(i) if i in jpeg_set else "not a JPEG"
                pixels[i], reason = self._pillow(encoded[i], message)
                if pixels[i] is None:
                    bad[i] = reason
        if len(bad) == n:
            return None, bad, notes
        crop = self.pre.crop
        zero = torch.zeros((len(self.views), crop, crop, 3), dtype=torch.float32, device=self.device)
        batch = torch.stack([zero if p is None else self._crops(p, g) for p, g in zip(pixels, geoms, strict=True)])
        batch = (batch - self.mean) / self.std  # [n, views, crop, crop, 3]
        if bad:
            batch[list(bad)] = 0.0
        return batch.flatten(0, 1), bad, notes
