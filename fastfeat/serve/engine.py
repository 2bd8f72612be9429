"""The model side of the server: the same weights, header check, DALI decoder, backend and forward
stage as ``fastfeat extract``, so a served feature is made exactly as a stored one."""

from __future__ import annotations

import io
import time

import numpy as np
import torch

from ..backends import unavailable_reason
from ..errors import ConfigError
from ..extractor import weights_identity
from ..graphs import resolve_cuda_graphs
from ..header import DEFAULT_MAX_PIXELS
from ..model_lookup import resolve_model
from ..models import default_decoder
from ..runtime import resolve_device, resolve_precision
from ..stages import StageOptions, build_stages, mean_for
from ..weights import load_weights
from .config import ServeConfig


class Engine:
    """Loads the model once; ``check`` runs in request handlers, ``decode``/``forward`` in the batcher's threads."""

    def __init__(self, cfg: ServeConfig, layers: list[str]):
        self.spec, self.layers = resolve_model(cfg.model, cfg.pool), layers
        self.max_pixels = cfg.max_pixels or DEFAULT_MAX_PIXELS
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.cuda_graphs = resolve_cuda_graphs(cfg.cuda_graphs, self.device, cfg.backend)
        if (why := unavailable_reason(cfg.backend, self.device)) is not None:
            raise ConfigError(f"backend {cfg.backend!r} is not available: {why}")
        self.weights_id, weights = weights_identity(self.spec, cfg.weights)
        weights = weights or load_weights(self.spec, cfg.weights)
        # A served image is one centre view, as extract's default; its metadata is what a shard made with
        # these settings carries.
        options = StageOptions(
            self.spec, layers, self.device, self.precision, backend=cfg.backend, dtype=cfg.dtype,
            batch_size=cfg.max_batch, num_threads=cfg.threads, max_pixels=self.max_pixels,
            cuda_graphs=self.cuda_graphs, compile_mode=cfg.compile_mode, mean_file=cfg.mean_file, mean_image=mean_for(cfg.mean_file, self.spec.preprocess, "center"),
            weights_id=self.weights_id, decoder=cfg.decoder or default_decoder(),
        )  # fmt: skip
        # float32 out of the forward stage; a float16 response is cast from it as extract casts its rows.
        self.stages = build_stages(options, weights.tensors, forward_dtype="float32", pad_short_batches=False)
        self.mean_image, self.metadata, self.dims = options.mean_image, self.stages.metadata, self.stages.dims
        self.backend_name, self.dtype = cfg.backend, cfg.dtype
        # Backends that compile per input shape (torch.compile, Triton autotuning) get batches padded to a
        # power of two, so that at most log2(max_batch)+1 shapes ever compile instead of one per batch size.
        # (CUDA graphs pad to the same buckets themselves.)
        self.pad_batches = self.stages.net.compiles_on_first_call and not self.cuda_graphs
        self.decoder, self._forward = self.stages.decoder, self.stages.forward
        self.busy = {"h2d": 0.0, "forward": 0.0, "d2h": 0.0}
        self.max_batch = cfg.max_batch

    def check(self, data: bytes) -> tuple[np.ndarray | None, tuple[int, int], str | None]:
        """(bytes as uint8, upright (width, height), None) or (None, size, reason): extract's header check."""
        encoded, size, err = self.stages.read_bytes(data)
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
        for n in sizes if self.pad_batches or self.cuda_graphs else sizes[:1]:  # capture every bucket's graph
            images, _, _ = self.decode([sample] * n, [size] * n)
            self.forward(images, list(range(n)))
        return time.perf_counter() - t0
