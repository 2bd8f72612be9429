"""The forward stage: a decoded batch -> the requested layers' activations of its good images,
flattened (C×H×W order) and cast to the stored dtype, on the host."""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch

from .augment import reduce_views
from .backends.base import Backend
from .runtime import make_current, release_freed_memory

OUTPUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Freed heap pages go back to the OS every this many images: often enough to keep RSS flat over a
# long run (see runtime.release_freed_memory), rarely enough that re-faulting them costs ~nothing.
TRIM_EVERY_IMAGES = 2048


class _HostClock:
    """CPU: a stage's time is the wall time of its calls."""

    def mark(self) -> float:
        return time.perf_counter()

    def wait(self, mark: float) -> None:
        pass

    def seconds(self, start: float, end: float) -> float:
        return end - start


class _StreamClock:
    """CUDA: a stage's time is the GPU time between two events on the forward stream.

    No device-wide synchronisation: ``torch.cuda.synchronize`` would also wait for the decoder's
    (DALI's) GPU work of the next batch and serialise decode with the forward pass.
    """

    def __init__(self, stream):
        self.stream = stream

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def wait(self, mark) -> None:
        mark.synchronize()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3


class Forward:
    """``forward(images, good, busy)``: host->device, forward, device->host, each timed on its own
    into ``busy``.

    On CUDA the stage runs on its own stream on the backend's device, made current in the calling
    thread (Triton launches on the current device and stream), and is timed with events on that
    stream; the device->host copy waits for this stream only, so the decoder's GPU work for the next
    batch overlaps the forward pass.

    ``graph_rows``: run the forward pass through CUDA graphs (fastfeat.graphs) for batches of up to
    this many rows (the run's batch size times its views), None for none.

    The backend's outputs are its plan's (or graph's) buffers, reused by the next batch: they are
    copied to the host here, before this call returns, and nothing else holds them."""

    def __init__(
        self, net: Backend, layers: list[str], dtype: str, views: int = 1, reduce: str = "mean",
        pad_rows: int | None = None, graph_rows: int | None = None,
    ):  # fmt: skip
        self.net, self.layers, self.out_dtype = net, layers, OUTPUT_DTYPES[dtype]
        self.views, self.reduce = views, reduce  # test-time augmentation: rows per image, and their reduction
        # A short batch (a shard's last, say) is padded with zero rows to this many, the padded rows dropped:
        # GEMM libraries pick their kernel, and with it the summation order, by the number of rows (MKL's
        # sgemm on AVX2 does for M <= 4), so an image's features would depend on how many batch-mates it
        # had; with every batch the same height they do not (an --append run equals a clean one).
        self.pad_rows = pad_rows
        self.device = net.device
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the constructing thread's device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.clock = _StreamClock(self.stream) if self.stream is not None else _HostClock()
        self._since_trim = 0
        self.graphs = None
        if graph_rows is not None:
            from .graphs import GraphForward

            self.graphs = GraphForward(partial(net.forward_intermediates, names=layers), graph_rows)

    def __call__(self, images: torch.Tensor, good: list[int], busy: dict[str, float]) -> dict[str, np.ndarray]:
        self._since_trim += len(images)
        if self._since_trim >= TRIM_EVERY_IMAGES:  # between batches: no activation is alive now
            self._since_trim = 0
            release_freed_memory()
        make_current(self.device)  # per thread: the runner calls this from its forward thread
        clock = self.clock
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            if images.is_cuda:  # made on the decoder's stream: keep its memory until this stream is done
                images.record_stream(self.stream)
            t0 = clock.mark()
            if self.pad_rows is not None and images.shape[0] < self.pad_rows:
                padded = images.new_zeros((self.pad_rows, *images.shape[1:]))
                padded[: images.shape[0]] = images
                images = padded
            x = self.net.prepare(images)
            rows = torch.tensor(good, device=x.device)
            t1 = clock.mark()
            acts = self.graphs(x) if self.graphs is not None else self.net.forward_intermediates(x, self.layers)
            t2 = clock.mark()
            feats = {}
            for name in self.layers:
                a = acts[name] if self.views == 1 else reduce_views(acts[name], self.views, self.reduce)
                a = a.index_select(0, rows).reshape(len(good), -1)
                feats[name] = a.to(self.out_dtype).cpu().numpy()  # waits for this stream's work only
            t3 = clock.mark()
        clock.wait(t3)
        busy["h2d"] += clock.seconds(t0, t1)
        busy["forward"] += clock.seconds(t1, t2)
        busy["d2h"] += clock.seconds(t2, t3)
        return feats
