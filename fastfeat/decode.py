"""Image decoding and preprocessing with NVIDIA DALI.  The header check of the read stage
(``read_image``) and the geometry are in fastfeat.header, ``--mean-file`` in fastfeat.means (both
torch-free); the names stay importable from here.

DALI is fed encoded bytes through ``external_source`` by fastfeat's own reader, so
fastfeat keeps control of ids, order and error handling.  Two styles:

* ``caffe`` (CaffeNet default, as DeCAF): warp the whole image to 256×256 (aspect
  ratio not kept), centre-crop 227, BGR, subtract a per-channel mean (104, 117, 123)
  or a mean image from a ``.npy`` file.  Resizing is plain bilinear without
  antialiasing, as Caffe's ``caffe.io.resize_image`` (order-1 interpolation) did.
* ``torchvision`` (AlexNet default): resize the shorter side to 256 with antialiased
  bilinear (torchvision's default), centre-crop 224, RGB, ImageNet mean/std.

Greyscale images are replicated to three channels and an alpha channel is dropped
(DALI's ``output_type=RGB/BGR`` conversion).  EXIF orientation is applied by DALI's
decoder (``adjust_orientation``, on by default), so an image is seen upright.

On CUDA, decoding uses nvJPEG (``device="mixed"``) and the resize runs on the GPU;
without CUDA the whole pipeline runs on the CPU (``device_id=None``).

Decode modes (``--decode``; recorded in every shard's metadata, so a run never mixes them):

* ``exact``: decode the whole image, resize it whole, then crop (the reference arithmetic).
* ``fast`` (default): only the crop window is resized.  DALI's resize takes the window in source
  pixels (``roi_start``/``roi_end``) and writes crop×crop pixels directly, instead of resizing the
  whole image and discarding the margins (30-45% of the resized pixels of an ImageNet-like photo).
  The sample positions are the same; pixels differ from ``exact`` by the resize's uint8 rounding
  (at most one grey level): features differ by 1e-4 relative (AlexNet) and less (CaffeNet).
* ``dct``: ``fast``, and on the CPU a JPEG at least twice the resize target in both dimensions is
  decoded by libjpeg-turbo at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's ``draft``), to the
  smallest scale still at least the target, then resized by the same DALI operator.  About 2× less
  CPU per 2-12 megapixel photo (entropy decoding, which scaling cannot skip, is then most of the
  cost), but the DCT-domain box filter before the resize changes the features by 3-7% relative,
  far more than ``fast``: opt-in.  nvJPEG has no scaled decode, so on CUDA ``dct`` is ``fast``.
  Measured by ``benchmarks/decode_modes.py`` (benchmarks/results/decode_modes_cpu.json).

DALI aborts a whole batch when one sample fails to decode.  ``Decoder.decode``
then rebuilds the pipeline and decodes the batch's samples one at a time, so the
bad ones are reported and every good one still gets exactly the pixels it gets in
a clean batch (DALI's per-sample CPU operators do not depend on batch company).
A sample DALI cannot decode (GIF, for one) is decoded by Pillow and then resized
and cropped by the same DALI operators; only when Pillow fails too is it an error.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
import torch

from .augment import AUGMENTS, DEFAULT_AUGMENT, View
from .console import captured_native_stderr, console  # noqa: F401  (console: re-exported for old importers)
from .header import DEFAULT_MAX_PIXELS, EXIF_ORIENTATION, JPEG_MAGIC, geometry, read_image  # noqa: F401
from .means import PreprocessError, load_mean  # noqa: F401  (re-exported: fastfeat.decode.load_mean)
from .models import DECODE_MODES, DEFAULT_DECODE, Preprocess


class SampleError(RuntimeError):
    """DALI failed on the content of a sample (a corrupt or unsupported image)."""


# Failures that are the machine's, not the image's, by their text: never turned into per-image error rows.
_MACHINE_ERRORS = (
    "out of memory", "bad_alloc", "can't allocate", "cannot allocate", "cuda error", "cudaerror", "cuda_error",
    "cuda runtime api error", "cuda driver", "illegal memory access", "illegal address", "launch failure",
    "device-side assert", "peer gpu memory", "hardware error", "ecc error", "nvml",
)  # fmt: skip
# DALI reports an nvImageCodec call that failed as "nvImageCodec failure: '#N'", N an nvimgcodecStatus_t
# (nvimgcodec.h).  These N are properties of the code stream: 3 BAD_CODESTREAM, 4 CODESTREAM_UNSUPPORTED,
# 9 IMPLEMENTATION_UNSUPPORTED and their EXTENSION_ forms 13, 14, 18, 19 (INCOMPLETE_BITSTREAM).  Every
# other one is the machine's: 5/15 ALLOCATOR_FAILURE, 6/20 EXECUTION_FAILED, 8/17 INTERNAL_ERROR,
# 21 CUDA_CALL_ERROR, 7/16 ARCH_MISMATCH, 1/11 NOT_INITIALIZED, 2/12 INVALID_PARAMETER, 10 MISSED_DEPENDENCIES.
_NVIMGCODEC_STATUS = re.compile(r"nvImageCodec failure: '#(\d+)'")
_SAMPLE_STATUSES = frozenset({3, 4, 9, 13, 14, 18, 19})
# nvJPEG statuses that mean bad data; any other NVJPEG_STATUS_* (allocator, execution, internal) is the machine's.
_NVJPEG_SAMPLE_STATUSES = ("NVJPEG_STATUS_BAD_JPEG", "NVJPEG_STATUS_JPEG_NOT_SUPPORTED")


def _is_sample_error(message: str, raw: bool) -> bool:
    """Whether a DALI failure (a RuntimeError; other exception types always propagate) is the image's fault.

    It takes positive evidence: the image decoder's operator failed on a sample ("Failed to decode sample",
    or an nvImageCodec status that describes the code stream), and nothing in the text is a CUDA, allocator
    or nvJPEG execution failure.  The raw pipeline (``raw``) takes pixels Pillow already decoded, so nothing
    image-specific is left to fail there.  Anything else fails the run instead of becoming error rows.
    """
    if raw:
        return False
    lower = message.lower()
    if "decoders.image" not in message or any(s in lower for s in _MACHINE_ERRORS):
        return False
    if "NVJPEG_STATUS_" in message and not any(s in message for s in _NVJPEG_SAMPLE_STATUSES):
        return False
    statuses = {int(n) for n in _NVIMGCODEC_STATUS.findall(message)}
    if statuses:
        return statuses <= _SAMPLE_STATUSES
    return "failed to decode sample" in lower or any(s in message for s in _NVJPEG_SAMPLE_STATUSES)


def decoder_options(on_gpu: bool, hw_decoder_load: float = 0.0) -> dict:
    """Keyword arguments of ``fn.decoders.image`` beyond its input and ``output_type``.

    * ``jpeg_fancy_upsampling=True`` (mixed only; DALI's default is False): the GPU decoder upsamples
      chroma as libjpeg-turbo does on the CPU.  Without it a chroma-subsampled JPEG (nearly every photo,
      4:2:0) decodes to different pixels on a GPU than on a CPU; with it the two should agree up to
      IDCT and colour-conversion rounding (unmeasured: ``benchmarks/gpu_check.py``'s decode step does).
    * ``hw_decoder_load`` (mixed only; DALI's default 0.65): the share of each batch given to the
      hardware JPEG engines of A100/H100/H200, by position in the batch.  Default 0: the engines round
      differently from the CUDA decoder and do not do fancy upsampling, so an image's pixels would
      depend on its batch company and differ from a CPU decode, against the exactly-once guarantee
      (a resumed or re-decoded batch gives the same bytes).  ``benchmarks/gpu_check.py`` measures what
      the engines would gain (decode img/s and pixel difference) where DALI is installed with a GPU.
    """
    if not on_gpu:
        return {}
    return {"jpeg_fancy_upsampling": True, "hw_decoder_load": float(hw_decoder_load)}


def _dali_message(exc: Exception) -> str:
    """The useful line of a DALI 'Critical error in pipeline' message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if "encountered:" in lines:
        i = lines.index("encountered:")
        tail = [ln for ln in lines[i + 1 :] if not ln.startswith("Current pipeline object")]
        if tail:
            return " ".join(tail)[:500]
    return (lines[-1] if lines else type(exc).__name__)[:500]


class Decoder:
    """A DALI pipeline that turns a list of encoded images into an NHWC float32 torch batch."""

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
        if mode not in DECODE_MODES:
            raise PreprocessError(f"unknown decode mode {mode!r}; choose from {', '.join(DECODE_MODES)}")
        self.pre, self.batch_size, self.device = pre, batch_size, device
        # Resize only the crop window: one centre view (several views crop different windows of one resize).
        self.window_resize = mode != "exact" and len(views) == 1 and views[0].anchor == "center"
        # Scaled JPEG decoding is libjpeg-turbo's (Pillow on the CPU): nvJPEG has none.
        self.dct_scaling = mode == "dct" and device.type != "cuda"
        self.hw_decoder_load = hw_decoder_load  # see decoder_options
        self.views = views  # the crops of each image (fastfeat.augment): a batch has len(views) rows per image
        self.num_threads = num_threads or max(1, os.cpu_count() or 1)
        self._scaled_pool = None  # threads decoding large JPEGs at reduced scale (Pillow releases the GIL)
        mean = np.asarray(pre.mean, np.float32) if mean_image is None else np.asarray(mean_image, np.float32)
        self.per_channel_mean = mean.shape == (3,)
        self.channel_mean = [float(v) for v in mean] if self.per_channel_mean else [0.0, 0.0, 0.0]
        # Mean images are subtracted in torch after the crop; per-channel means fuse into DALI.
        self.mean_image = None if self.per_channel_mean else torch.from_numpy(mean).to(device)
        self.std = torch.tensor(pre.std, dtype=torch.float32, device=device)
        # The decoder's own CUDA stream: on the calling thread's default (legacy) stream the copy out of
        # DALI and the mean subtraction would queue behind the forward pass of the previous batch.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pipe = self._build()
        # Built on first use, once, and reused: the one-sample pipeline that decodes a failed batch's
        # samples one by one (and finds which sample the decoder warned about); the Pillow fallback's.
        self.single_pipe = None
        self.raw_pipe = None
        self._probe = None  # a small valid JPEG and its geometry: is a pipeline usable after a failure?

    def _build(self, raw: bool = False, batch_size: int | None = None):
        """The built DALI pipeline; ``raw`` takes already-decoded HWC uint8 pixels (the PIL fallback)."""
        pipe = self._define(raw, batch_size)
        pipe.build()
        return pipe

    def close(self) -> None:
        """Stop the scaled-decode threads and release the pipelines (the decoder is not used again)."""
        if self._scaled_pool is not None:
            self._scaled_pool.shutdown(wait=True)
            self._scaled_pool = None
        self.pipe = self.single_pipe = self.raw_pipe = None

    def _define(self, raw: bool = False, batch_size: int | None = None):
        """The DALI pipeline, defined but not built (building a GPU pipeline needs the GPU)."""
        from nvidia.dali import fn, pipeline_def, types

        pre, on_gpu = self.pre, self.device.type == "cuda"
        mean = self.channel_mean
        std = list(map(float, self.pre.std)) if self.per_channel_mean else [1.0, 1.0, 1.0]

        @pipeline_def(
            batch_size=batch_size or self.batch_size,
            num_threads=self.num_threads,
            device_id=(self.device.index or 0) if on_gpu else None,
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        def pipeline():
            if raw:
                encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=3, layout="HWC")
            else:
                encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
            # Per-sample geometry computed on the host from the header (see ``geometry``), so that
            # output sizes and crop offsets follow Caffe's / torchvision's integer arithmetic exactly.
            order = types.BGR if pre.channel_order == "BGR" else types.RGB
            # A torchvision/timm model's own resampling (its config's interpolation; fastfeat.zoo).
            interp = {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC, "nearest": types.INTERP_NN}[
                getattr(pre, "interpolation", "linear")
            ]
            if raw:
                images = encoded.gpu() if on_gpu else encoded
            else:
                extra = decoder_options(on_gpu, self.hw_decoder_load)
                images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=order, **extra)
            if self.window_resize:
                # The crop window [start, end) in source pixels, resized straight to crop×crop: the
                # same sample positions as resizing the whole image and cropping (see _window).
                start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
                end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
                images = fn.resize(
                    images, size=[float(pre.crop)] * 2, roi_start=start, roi_end=end, roi_relative=False,
                    antialias=pre.style != "caffe", interp_type=interp,
                )  # fmt: skip
                (view,) = self.views
                crop = fn.crop_mirror_normalize(
                    images, mirror=int(view.mirror), mean=mean, std=std, dtype=types.FLOAT, output_layout="HWC"
                )
                return crop
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            pos_y = fn.external_source(name="pos_y", dtype=types.FLOAT, ndim=0)
            pos_x = fn.external_source(name="pos_x", dtype=types.FLOAT, ndim=0)
            images = fn.resize(images, size=size, antialias=pre.style != "caffe", interp_type=interp)
            # Every view is cropped from the same resized image: one decode and one resize per image.
            # A corner's relative position is 0 or 1 (DALI's anchor round(pos * (size - crop)) is then exact).
            crops = [
                fn.crop_mirror_normalize(
                    images,
                    crop=(pre.crop, pre.crop),
                    crop_pos_x=pos_x if v.anchor == "center" else float(v.anchor.endswith("right")),
                    crop_pos_y=pos_y if v.anchor == "center" else float(v.anchor.startswith("bottom")),
                    mirror=int(v.mirror),
                    mean=mean,
                    std=std,
                    dtype=types.FLOAT,
                    output_layout="HWC",
                )
                for v in self.views
            ]
            return crops[0] if len(crops) == 1 else fn.stack(*crops)  # [views, crop, crop, 3] per image

        return pipeline()

    def _window(self, geom: tuple[int, int, int, int], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The crop window of ``geom`` in the pixels of a height×width input, as DALI's resize ROI.

        Resized pixel j samples source position (j + 0.5) * in/resized - 0.5; output pixel i of the
        window resize samples start + (i + 0.5) * (end - start) / crop - 0.5.  With start = top * in /
        resized and end - start = crop * in / resized the two coincide for j = top + i.
        """
        rh, rw, top, left = geom
        crop, sy, sx = self.pre.crop, height / rh, width / rw
        start = np.array([top * sy, left * sx], np.float32)
        end = np.array([(top + crop) * sy, (left + crop) * sx], np.float32)
        return start, end

    def _run(
        self, encoded: list[np.ndarray], geoms: list[tuple[int, int, int, int]], pipe=None,
        dims: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Run the pipeline on samples; a sample-level failure raises SampleError, anything else propagates.

        ``dims``: each input's upright (height, width) as the decoder will see it (the window resize
        needs it); by default the (height, width) of already-decoded HWC samples."""
        crop, pipe = self.pre.crop, pipe or self.pipe
        pipe.feed_input("encoded", encoded)
        if self.window_resize:
            dims = dims or [e.shape[:2] for e in encoded]
            windows = [self._window(g, h, w) for g, (h, w) in zip(geoms, dims, strict=True)]
            pipe.feed_input("roi_start", [w[0] for w in windows])
            pipe.feed_input("roi_end", [w[1] for w in windows])
        else:
            pipe.feed_input("size", [np.array(g[:2], np.float32) for g in geoms])
            # DALI places the crop at round(pos * (size - crop)): an exact integer offset needs pos = off / (size - crop).
            pipe.feed_input("pos_y", [np.array(g[2] / max(g[0] - crop, 1), np.float32) for g in geoms])
            pipe.feed_input("pos_x", [np.array(g[3] / max(g[1] - crop, 1), np.float32) for g in geoms])
        try:
            (out,) = pipe.run()
        except RuntimeError as exc:  # any other type (MemoryError...) propagates as it is
            if _is_sample_error(str(exc), raw=pipe is self.raw_pipe):
                if self.device.type == "cuda":  # a broken CUDA context raises here: the run fails, as it must
                    torch.cuda.synchronize(self.device)
                raise SampleError(_dali_message(exc)) from None
            raise  # out of memory, CUDA failure...: not the image's fault, must not become an error row
        tensor = out.as_tensor()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            stream = torch.cuda.current_stream(self.device)
            batch = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(tensor, batch, cuda_stream=stream)
            stream.synchronize()  # the copy must finish before DALI's next run reuses its buffer
        else:
            # Copy: DALI reuses its output buffer on the next run.
            batch = torch.from_numpy(np.array(tensor, copy=True))
        return batch.flatten(0, 1) if len(self.views) > 1 else batch  # image-major rows: image i's views together

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

    def _decode(
        self, encoded: list[np.ndarray], sizes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor | None, dict[int, str], dict[int, str]]:
        """Decode a batch of encoded images whose upright (width, height) are ``sizes``.

        Returns (NHWC float32 batch, {bad index: message}, {warned index: message}).  The batch
        always has ``len(encoded)`` rows per view (image-major): a sample that failed to decode gets a row of zeros, so
        the forward pass sees the same batch shape as in a clean run and the good rows get
        bit-identical features.  None if all failed.  A sample the decoder warned about
        (recoverable corruption: it decoded, maybe with grey blocks) is in the batch and in the
        warnings, with the decoder's message.
        """
        if not encoded:
            return None, {}, {}
        geoms = [geometry(self.pre, w, h) for w, h in sizes]
        dims = [(h, w) for w, h in sizes]  # the decoder's upright (height, width)
        scaled = self._decode_scaled(encoded, sizes, geoms) if self.dct_scaling else {}
        if not scaled:
            batch, bad, notes = self._decode_encoded(encoded, geoms, dims)
        else:
            batch, bad, notes = self._decode_mixed(encoded, geoms, dims, scaled)
        if batch is None:
            return None, bad, notes
        if self.mean_image is not None:
            by_image = batch.unflatten(0, (-1, len(self.views)))  # a view: the in-place ops below write batch
            by_image -= self.mean_image  # [crop, crop, 3], or one per view [views, crop, crop, 3]
            batch /= self.std
            by_image[list(bad)] = 0.0
        return batch, bad, notes

    def _decode_mixed(self, encoded, geoms, dims, scaled: dict[int, np.ndarray]):
        """The batch when some samples were decoded at reduced scale (``scaled``) and the rest by DALI."""
        views = len(self.views)
        rows: list[torch.Tensor | None] = [None] * len(encoded)  # [views, crop, crop, 3] per image
        order = sorted(scaled)
        # Decoded pixels: a failure here is never the image's (see _is_sample_error), it fails the run.
        for k, row in enumerate(
            self._raw([scaled[i] for i in order], [geoms[i] for i in order]).unflatten(0, (-1, views))
        ):
            rows[order[k]] = row
        rest = [i for i in range(len(encoded)) if i not in scaled]
        bad, notes = {}, {}
        if rest:
            pick = lambda seq: [seq[i] for i in rest]  # noqa: E731
            part, part_bad, part_notes = self._decode_encoded(pick(encoded), pick(geoms), pick(dims))
            bad = {rest[k]: m for k, m in part_bad.items()}
            notes = {rest[k]: m for k, m in part_notes.items()}
            if part is not None:
                for k, row in enumerate(part.unflatten(0, (-1, views))):
                    rows[rest[k]] = row  # a bad sample's row is zeros already
        zero = torch.zeros_like(rows[order[0]])
        return torch.stack([zero if r is None else r for r in rows]).flatten(0, 1), bad, notes

    def _decode_encoded(self, encoded, geoms, dims):
        """DALI's decode of encoded samples: (batch, {bad: message}, {warned: message})."""
        try:
            with captured_native_stderr() as said:
                batch, bad, notes = self._run(encoded, geoms, dims=dims), {}, {}
            if said[0]:  # which sample was it? Decode each alone (rare: only batches with a warning)
                notes = self._warnings_by_sample(encoded, geoms, dims)
        except SampleError:
            batch, bad, notes = self._decode_one_by_one(encoded, geoms, dims)
        return batch, bad, notes

    def _raw(self, pixels: list[np.ndarray], geoms) -> torch.Tensor:
        """Resize, crop and normalise already-decoded HWC uint8 pixels in the model's channel order."""
        if self.raw_pipe is None:
            self.raw_pipe = self._build(raw=True)
        return self._run(pixels, geoms, self.raw_pipe)

    def _decode_scaled(self, encoded, sizes, geoms) -> dict[int, np.ndarray]:
        """{index: pixels} of the JPEGs at least twice their resize target in both dimensions, decoded
        by libjpeg-turbo in the DCT domain at the smallest of 1/2, 1/4, 1/8 that is still at least the
        target (Pillow's ``draft``).  A sample Pillow cannot decode is left to DALI (and its errors)."""
        chosen = [
            i for i, (sample, (w, h), g) in enumerate(zip(encoded, sizes, geoms, strict=True))
            if sample[:2].tobytes() == JPEG_MAGIC and w >= 2 * g[1] and h >= 2 * g[0]
        ]  # fmt: skip
        if not chosen:
            return {}
        if self._scaled_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._scaled_pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="fastfeat-scaled-decode")
        decoded = self._scaled_pool.map(lambda i: self._pil_scaled(encoded[i], geoms[i]), chosen)
        return {i: px for i, px in zip(chosen, decoded, strict=True) if px is not None}

    def _pil_scaled(self, sample: np.ndarray, geom) -> np.ndarray | None:
        from PIL import Image, ImageOps

        rh, rw = geom[:2]
        try:
            with Image.open(io.BytesIO(sample.tobytes())) as im:
                # draft takes the stored (not upright) size: swap the target for 90-degree orientations.
                turned = im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
                im.draft("RGB", (rh, rw) if turned else (rw, rh))
                pixels = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except MemoryError:
            raise
        except Exception:  # a damaged JPEG: DALI decodes it (or reports it) as any other image
            return None
        if pixels.shape[0] < rh or pixels.shape[1] < rw:  # never upsample what a full decode would shrink
            return None
        return np.ascontiguousarray(pixels[..., ::-1] if self.pre.channel_order == "BGR" else pixels)

    def _single(self):
        """The one-sample pipeline, built once."""
        if self.single_pipe is None:
            self.single_pipe = self._build(batch_size=1)
        return self.single_pipe

    def _usable_after_failure(self, pipe) -> bool:
        """Whether ``pipe`` still decodes after a sample failed in it: a small valid JPEG must go through.
        DALI 2 keeps a pipeline usable after a sample's failure, so this is one small decode, where a
        rebuild (per failing batch and per bad sample, before) costs a new pipeline each time, on a GPU
        the decoder's state and buffers too."""
        if self._probe is None:
            from PIL import Image

            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (128, 64, 32)).save(buf, format="JPEG")
            self._probe = (np.frombuffer(buf.getvalue(), np.uint8), geometry(self.pre, 16, 16))
        sample, geom = self._probe
        try:
            self._run([sample], [geom], pipe, dims=[(16, 16)])
        except (SampleError, RuntimeError):
            return False
        return True

    def _after_failure(self, name: str) -> None:
        """Keep pipeline ``name`` ("pipe" or "single_pipe") after a sample failed in it, unless it no longer
        decodes a valid image: then (only then) build it anew."""
        if not self._usable_after_failure(getattr(self, name)):
            setattr(self, name, self._build(batch_size=1 if name == "single_pipe" else None))

    def _warnings_by_sample(self, encoded, geoms, dims) -> dict[int, str]:
        notes = {}
        for i, (sample, geom, dim) in enumerate(zip(encoded, geoms, dims, strict=True)):
            with captured_native_stderr() as said:
                self._run([sample], [geom], self._single(), dims=[dim])
            if said[0]:
                notes[i] = said[0]
        return notes

    def _pil_fallback(self, sample: np.ndarray, geom, dali_message: str) -> tuple[torch.Tensor | None, str]:
        """Decode with Pillow what DALI cannot (GIF, odd JPEGs), then resize/crop/normalise in DALI.

        Pillow's first frame, EXIF-transposed and converted to RGB (palette, CMYK,
        16-bit and alpha images included), goes through the same DALI resize and
        crop as every other image.  Returns (row, "") or (None, reason).
        """
        import io

        from PIL import Image, ImageOps

        try:
            with Image.open(io.BytesIO(sample.tobytes())) as im:
                im.seek(0)
                pixels = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except MemoryError:
            raise
        except Exception as exc:  # Pillow raises many types for a bad file; we only want the text
            return None, f"{dali_message} (Pillow: {type(exc).__name__}: {exc})"
        if self.pre.channel_order == "BGR":
            pixels = pixels[..., ::-1]
        # A failure here is never the image's (see _is_sample_error): it propagates and fails the run.
        return self._raw([np.ascontiguousarray(pixels)], [geom]), ""

    def _decode_one_by_one(self, encoded, geoms, dims):
        rows: list[torch.Tensor | None] = []
        bad: dict[int, str] = {}
        notes: dict[int, str] = {}
        self._after_failure("pipe")  # the batch failed in it
        for i, (sample, geom, dim) in enumerate(zip(encoded, geoms, dims, strict=True)):
            try:
                with captured_native_stderr() as said:
                    rows.append(self._run([sample], [geom], self._single(), dims=[dim]))  # [views, crop, crop, 3]
                if said[0]:
                    notes[i] = said[0]
            except SampleError as exc:
                self._after_failure("single_pipe")
                row, message = self._pil_fallback(sample, geom, str(exc))
                rows.append(row)
                if row is None:
                    bad[i] = message
        good = [r for r in rows if r is not None]
        if not good:
            return None, bad, notes
        zero = torch.zeros_like(good[0])
        return torch.cat([zero if r is None else r for r in rows]), bad, notes
