"""One builder of the stage stack every path runs: read (header checks) -> decode (mean, views, decode
mode) -> forward (backend, layers, view reduction), and what a sink needs (the metadata, each layer's
width).  ``fastfeat extract``, the Ray worker (``fastfeat.ray_worker``), the Ray Data mapper
(``fastfeat.ray_data``) and ``fastfeat serve`` all call :func:`build_stages`, so a feature is made the
same way whichever of them made it (tests/test_stages.py holds them to the same bytes).

What differs between the callers stays with them: where the items come from (:class:`BytesReader` for
bytes already in memory), how many threads they may use, the server's padded batches.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .augment import DEFAULT_AUGMENT, augment_metadata, augmented_mean, get_views
from .header import DEFAULT_MAX_PIXELS, read_image
from .means import load_mean
from .models import DEFAULT_DECODE, default_decoder
from .version import __version__


@dataclass(frozen=True, eq=False)  # eq=False: mean_image is an array
class StageOptions:
    """Everything that decides how an image becomes a feature row (and what a shard's metadata says)."""

    spec: object  # fastfeat.models.ModelSpec
    layers: list[str]
    device: object  # torch.device
    precision: str
    backend: str = "torch"
    dtype: str = "float16"  # of the stored rows
    batch_size: int = 64  # the decoder's largest batch
    num_threads: int | None = None  # the decoder's threads (None: every CPU)
    max_pixels: int = DEFAULT_MAX_PIXELS
    augment: str = DEFAULT_AUGMENT
    augment_reduce: str = "mean"
    decode: str = DEFAULT_DECODE
    decoder: str = field(default_factory=default_decoder)  # --decoder, resolved (fastfeat.models.DECODERS)
    cuda_graphs: bool = False  # --cuda-graphs, resolved (fastfeat.graphs.resolve_cuda_graphs)
    compile_mode: str | None = None  # --compile-mode as given (None: the compile backend's default)
    mean_file: str | None = None  # as given: recorded in the metadata
    mean_image: np.ndarray | None = None  # its contents, as mean_for() loads them (a Ray worker gets them
    # from the driver, so the file need not exist on the worker's host)
    weights_id: dict | None = field(default=None)  # extractor.weights_identity: only the metadata needs it

    @property
    def views(self):
        return get_views(self.augment)

    def dims(self) -> dict[str, int]:
        """Each layer's row width (C·H·W)."""
        shapes = self.spec.shapes()
        return {n: math.prod(shapes[n]) for n in self.layers}

    def metadata(self) -> dict:
        """What every shard's metadata (and serve's GET /v1/model) says about how its features were made."""
        return {
            **features_metadata(
                self.spec, self.weights_id, self.mean_file, self.mean_image, self.device, self.precision,
                self.backend, self.dtype, self.layers, decode=self.decode, cuda_graphs=self.cuda_graphs,
                compile_mode=self.compile_mode, decoder=self.decoder,
            ),
            # The run config holds the metadata: a resume with other views or reduction is refused.
            "augment": augment_metadata(self.augment, self.augment_reduce),
        }  # fmt: skip


def mean_for(mean_file: str | None, pre, augment: str) -> np.ndarray | None:
    """``--mean-file`` as the decoder subtracts it: the model's centre crop of the mean (or a per-channel
    mean), or, under any augmentation but the plain centre view, one crop per view, mirrored with its
    view (``flip`` too: its single view is mirrored, so its mean must be)."""
    if not mean_file:
        return None
    if augment != DEFAULT_AUGMENT:
        return augmented_mean(mean_file, pre, get_views(augment))
    return load_mean(mean_file, pre.crop, pre.resize, pre.channel_order)


class BytesReader:
    """An ItemReader for bytes already in memory (an upload, a Ray Data row), so that read_image's header
    checks apply to them unchanged."""

    def __init__(self, data: bytes):
        self.data = data

    def read(self, _item) -> bytes:
        return self.data


@dataclass
class Stages:
    """The built stack: ``read(item)`` -> (bytes, size, error); ``decoder.decode``; ``forward``."""

    options: StageOptions
    net: object  # the backend
    decoder: object  # fastfeat.decode.Decoder
    forward: object  # fastfeat.forward.Forward
    reader: object  # an ItemReader (fastfeat.sources), or None where every item comes as bytes

    def read(self, item):
        return read_image(item, self.options.max_pixels, reader=self.reader, pre=self.options.spec.preprocess)

    def read_bytes(self, data: bytes, item_id: str = "upload"):
        """read_image on bytes already in memory: (bytes as uint8, upright size, None) or (None, size, error)."""
        from .sources import Item

        item = Item(id=item_id, path="", label=None)
        return read_image(item, self.options.max_pixels, reader=BytesReader(data), pre=self.options.spec.preprocess)

    @cached_property
    def metadata(self) -> dict:
        return self.options.metadata()

    def close(self) -> None:
        """Release what a run holds open: the decoder's threads and pipelines, the reader's open files."""
        try:
            self.decoder.close()
        finally:
            if self.reader is not None and hasattr(self.reader, "close"):
                self.reader.close()

    @cached_property
    def dims(self) -> dict[str, int]:
        return self.options.dims()


def build_stages(
    options: StageOptions, tensors: dict, reader=None, forward_dtype: str | None = None, pad_short_batches: bool = True
) -> Stages:
    """Load the backend with ``tensors`` and build the decoder and forward stage on ``options.device``.

    ``forward_dtype``: the forward stage's output dtype when it is not the stored one (the server answers
    float32 and casts per request as extract casts its rows).  ``pad_short_batches``: run a short batch
    padded to ``batch_size`` (see fastfeat.forward.Forward); the server, whose batches are short by design,
    pads its own way."""
    from .forward import Forward
    from .model_lookup import make_model_backend
    from .runtime import PRECISIONS, keep_freed_memory, make_current

    raise_pillow_limit(options.max_pixels)
    keep_freed_memory()
    make_current(options.device)  # cuda:N: weights, the decoder and any device-less CUDA call go to N
    net = make_model_backend(
        options.backend, options.spec, tensors, options.device, PRECISIONS[options.precision],
        compile_mode=options.compile_mode,
    )  # fmt: skip
    views = options.views
    decoder = decoder_class(options.decoder)(
        options.spec.preprocess, options.batch_size, options.device, options.num_threads, options.mean_image, views,
        mode=options.decode,
    )  # fmt: skip
    forward = Forward(
        net, options.layers, forward_dtype or options.dtype, len(views), options.augment_reduce,
        pad_rows=options.batch_size * len(views) if pad_short_batches and _bits_depend_on_rows(options) else None,
        graph_rows=options.batch_size * len(views) if options.cuda_graphs else None,
    )  # fmt: skip
    return Stages(options, net, decoder, forward, reader)


def _bits_depend_on_rows(options: StageOptions) -> bool:
    """Whether a row's features can change with the number of rows in its batch: on a CPU, the torch and
    compile backends call MKL/oneDNN, which pick a GEMM kernel (and so a summation order) by row count.
    The triton kernels compute each row alone (tests/kernels/test_determinism.py), and on CUDA the graphs
    pad to their bucket; padding there would only cost time (a whole batch for a short one)."""
    return options.device.type == "cpu" and options.backend != "triton"


def decoder_class(name: str):
    """The decoder class of a --decoder name (imported on use: DALI and torchvision are heavy)."""
    if name == "dali":
        from .decode import Decoder

        return Decoder
    if name == "torchvision":
        from .decode_torchvision import TorchvisionDecoder

        return TorchvisionDecoder
    raise ValueError(f"unknown decoder {name!r}")


def decoder_description(name: str, device) -> str:
    """What the metadata says decoded the images (so a resume with the other decoder is refused by name)."""
    if name == "torchvision":
        return "torchvision decode_jpeg " + ("(nvJPEG)" if device.type == "cuda" else "cpu (libjpeg-turbo)")
    return "nvidia-dali " + ("mixed (nvJPEG)" if device.type == "cuda" else "cpu")


def raise_pillow_limit(max_pixels: int) -> None:
    from PIL import Image

    # Pillow refuses headers above 2 x MAX_IMAGE_PIXELS by itself: never below our own limit.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_pixels)


def _sha256_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def features_metadata(
    spec, weights_id: dict, mean_file: str | None, mean_image: np.ndarray | None, device, precision: str,
    backend: str, dtype: str, layers: list[str], decode: str = DEFAULT_DECODE, cuda_graphs: bool = False,
    compile_mode: str | None = None, decoder: str = "dali",
) -> dict:  # fmt: skip
    """How features were made: a shard's metadata, and what ``fastfeat serve`` answers on GET /v1/model
    (one function, so a served feature and a stored one are described alike and can be compared)."""
    from .backends.compile_backend import recorded_mode
    from .runtime import device_name, library_versions

    shapes = spec.shapes()
    return {
        "fastfeat_version": __version__,
        "model": spec.name,
        "weights": weights_id,
        "preprocessing": {
            **spec.preprocess.to_dict(),
            "mean_file": os.path.abspath(mean_file) if mean_file else None,
            "mean_sha256": _sha256_array(mean_image) if mean_image is not None else None,
            "decoder": decoder_description(decoder, device),
            "decode": decode,  # fast / exact / dct: how much work the decoder skipped (fastfeat.decode)
        },
        "precision": precision,
        "backend": backend,
        # How the forward pass ran (--cuda-graphs resolved; torch.compile's mode for the compile backend).
        "cuda_graphs": bool(cuda_graphs),
        "compile_mode": recorded_mode(backend, device.type, compile_mode),
        "device": device.type,
        "device_name": device_name(device),
        "dtype": dtype,
        "layers": {n: list(shapes[n]) for n in layers},
        "layer_order": "C,H,W (conv layers flattened in C×H×W order)",
        "versions": library_versions(),
        # A torchvision/timm model: its library, architecture, --pool and where its preprocessing came from.
        **({"model_config": spec.config()} if getattr(spec, "is_zoo", False) else {}),
    }
