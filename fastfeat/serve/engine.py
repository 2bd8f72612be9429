"""The model side of the server: the same weights, header check, DALI decoder, backend and forward
stage as ``fastfeat extract``, so a served feature is made exactly as a stored one."""

from __future__ import annotations

import io
import time

import numpy as np
import torch

from ..augment import DEFAULT_AUGMENT
from ..backends import make_backend, unavailable_reason
from ..decode import DEFAULT_DECODE, DEFAULT_MAX_PIXELS, Decoder, load_mean, read_image
from ..errors import ConfigError
from ..extractor import _raise_pillow_limit, run_metadata, weights_identity
from ..forward import Forward
from ..models import get_model
from ..runtime import PRECISIONS, keep_freed_memory, resolve_device, resolve_precision
from ..sources import Item
from ..weights import load_weights
from .config import ServeConfig


class _Upload:
    """An ItemReader for bytes already in memory, so that read_image's header checks apply unchanged."""

    def __init__(self, data: bytes):
        self.data = data

    def read(self, item: Item) -> bytes:
        return self.data


class Engine:
    """Loads the model once; ``check`` runs in request handlers, ``decode``/``forward`` in the batcher's threads."""

    def __init__(self, cfg: ServeConfig, layers: list[str]):
        self.spec, self.layers = get_model(cfg.model), layers
        self.max_pixels = cfg.max_pixels or DEFAULT_MAX_PIXELS
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if (why := unavailable_reason(cfg.backend, self.device)) is not None:
            raise ConfigError(f"backend {cfg.backend!r} is not available: {why}")
        _raise_pillow_limit(self.max_pixels)
        self.weights_id, weights = weights_identity(self.spec, cfg.weights)
        weights = weights or load_weights(self.spec, cfg.weights)
        pre = self.spec.preprocess
        self.mean_image = mean_image = (
            load_mean(cfg.mean_file, pre.crop, pre.resize, pre.channel_order) if cfg.mean_file else None
        )
        # What a shard made with these settings carries, by extract's own function (it reads these
        # attributes): a served image is one centre view, as extract's default.
        self.backend_name, self.dtype = cfg.backend, cfg.dtype
        self.augment, self.augment_reduce, self.decode_mode = DEFAULT_AUGMENT, "mean", DEFAULT_DECODE
        self.metadata = run_metadata(self, cfg.mean_file)
        self.dims = {n: int(np.prod(self.spec.shapes()[n])) for n in layers}
        keep_freed_memory()
        net = make_backend(cfg.backend, self.spec, weights.tensors, self.device, PRECISIONS[self.precision])
        # Backends that compile per input shape (torch.compile, Triton autotuning) get batches padded to a
        # power of two, so that at most log2(max_batch)+1 shapes ever compile instead of one per batch size.
        self.pad_batches = net.compiles_on_first_call
        self.decoder = Decoder(pre, cfg.max_batch, self.device, num_threads=cfg.threads, mean_image=mean_image)
        # float32 out of the forward stage; a float16 response is cast from it as extract casts its rows.
        self._forward = Forward(net, layers, "float32")
        self.busy = {"h2d": 0.0, "forward": 0.0, "d2h": 0.0}
        self.max_batch = cfg.max_batch

    def check(self, data: bytes) -> tuple[np.ndarray | None, tuple[int, int], str | None]:
        """(bytes as uint8, upright (width, height), None) or (None, size, reason): extract's header check."""
        encoded, size, err = read_image(Item("upload", "", None), self.max_pixels, _Upload(data), self.spec.preprocess)
        return encoded, size, (err[1] if err else None)

    def decode(self, encoded: list[np.ndarray], sizes: list[tuple[int, int]]):
        return self.decoder.decode(encoded, sizes)

    def forward(self, images: torch.Tensor, good: list[int]) -> dict[str, np.ndarray]:
        n = images.shape[0]
        if self.pad_batches and n & (n - 1):
            padded = images.new_zeros((min(1 << n.bit_length(), max(self.max_batch, n)), *images.shape[1:]))
            padded[:n] = images
            images = padded
        return self._forward(images, good, self.busy)

    def warm_up(self) -> float:
        """One full batch through decode and forward before the port opens, so the first request does not
        pay for oneDNN's primitive creation (or, for compiling backends, compile every padded shape)."""
        from PIL import Image

        t0 = time.perf_counter()
        buf = io.BytesIO()
        ramp = np.linspace(0, 255, 320 * 240 * 3).reshape(240, 320, 3).astype(np.uint8)
        Image.fromarray(ramp).save(buf, format="JPEG", quality=90)
        sample, size, _ = self.check(buf.getvalue())
        sizes = sorted({1 << i for i in range(self.max_batch.bit_length())} | {self.max_batch}, reverse=True)
        for n in sizes if self.pad_batches else sizes[:1]:
            images, _, _ = self.decode([sample] * n, [size] * n)
            self.forward(images, list(range(n)))
        return time.perf_counter() - t0
