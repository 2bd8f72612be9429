"""The forward stage: a decoded batch -> the requested layers' activations of its good images,
flattened (C×H×W order) and cast to the stored dtype, on the host."""

from __future__ import annotations

import time

import numpy as np
import torch

from .augment import reduce_views
from .backends.base import Backend
from .runtime import release_freed_memory

OUTPUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Freed heap pages go back to the OS every this many images: often enough to keep RSS flat over a
# long run (see runtime.release_freed_memory), rarely enough that re-faulting them costs ~nothing.
TRIM_EVERY_IMAGES = 2048


class Forward:
    """``forward(images, good, busy)``: host->device, forward, device->host, each timed on its own
    into ``busy`` (synchronised on CUDA, so the times are the stage's own)."""

    def __init__(self, net: Backend, layers: list[str], dtype: str, views: int = 1, reduce: str = "mean"):
        self.net, self.layers, self.out_dtype = net, layers, OUTPUT_DTYPES[dtype]
        self.views, self.reduce = views, reduce  # test-time augmentation: rows per image, and their reduction
        device = net.device
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self._since_trim = 0

    def __call__(self, images: torch.Tensor, good: list[int], busy: dict[str, float]) -> dict[str, np.ndarray]:
        self._since_trim += len(images)
        if self._since_trim >= TRIM_EVERY_IMAGES:  # between batches: no activation is alive now
            self._since_trim = 0
            release_freed_memory()
        t0 = time.perf_counter()
        x = self.net.prepare(images)
        rows = torch.tensor(good, device=self.net.device)
        self.sync()
        t1 = time.perf_counter()
        acts = self.net.forward_intermediates(x, self.layers)
        self.sync()
        t2 = time.perf_counter()
        feats = {}
        for name in self.layers:
            a = acts[name] if self.views == 1 else reduce_views(acts[name], self.views, self.reduce)
            a = a.index_select(0, rows).reshape(len(good), -1)
            feats[name] = a.to(self.out_dtype).cpu().numpy()
        t3 = time.perf_counter()
        busy["h2d"] += t1 - t0
        busy["forward"] += t2 - t1
        busy["d2h"] += t3 - t2
        return feats
