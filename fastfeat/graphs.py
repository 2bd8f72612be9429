"""CUDA graphs of the whole forward pass, one per batch-size bucket (``--cuda-graphs``).

A forward pass of the triton backend is ~14 kernel launches whose host work (Python, the launcher, the
autotuner's lookup) costs more than the kernels at small batches; replaying a captured graph costs one
launch.  :class:`GraphForward` wraps any ``fn(x) -> {layer: tensor}`` (a backend's
``forward_intermediates``) and:

* buckets the batch: rows are padded up to the next power of two (capped at the run's largest batch),
  so a run's short last batch and a server's odd batches reuse a handful of graphs; padded rows are
  zeros and are dropped from the outputs (rows never mix: every layer computes each row alone);
* captures a bucket's graph on first use, after warming the function up on a side stream (Triton JIT
  and autotuning, torch's lazy module loads and cuDNN's algorithm choice all happen outside capture),
  into a static input buffer, in thread-local error mode: the decoder thread keeps allocating on its
  own stream meanwhile, which the global mode would turn into a capture error;
* keeps at most ``max_graphs`` graphs, evicting the least recently used (each holds its own memory);
* runs a bucket whose capture failed eagerly from then on, saying why once in the log.

Ownership: the tensors returned are views of the graph's static outputs (of a backend's plan buffers,
without graphs) and hold the next call's results once that call runs.  A caller that keeps them past
the next forward pass must copy them: ``fastfeat.forward.Forward`` copies every output to the host
before it returns, so the runner, the Ray worker and the server never see a buffer reused.

The capture itself is injected (``capture``), so that the bookkeeping runs and is tested on a CPU with
a stand-in that records what a graph would.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # imported where used: --cuda-graphs is checked before torch is imported
    import torch

CUDA_GRAPHS_CHOICES = ("auto", "on", "off")
# Backends that ``auto`` captures on CUDA; torch.compile has its own graphs (--compile-mode reduce-overhead).
AUTO_BACKENDS = ("torch", "triton")
# Graphs kept at once: every bucket of a batch of up to 128 rows (1, 2, 4, ..., 128): a server warms them all up.
DEFAULT_MAX_GRAPHS = 8
# Eager runs before a capture: the first compiles/autotunes, the second runs as the graph will.
WARMUP_RUNS = 2

log = logging.getLogger("fastfeat.graphs")

ForwardFn = Callable[["torch.Tensor"], "dict[str, torch.Tensor]"]
# capture(fn, static_input) -> (replay, static_outputs): replay() recomputes static_outputs from static_input.
CaptureFn = Callable[[ForwardFn, "torch.Tensor"], "tuple[Callable[[], None], dict[str, torch.Tensor]]"]


def check_cuda_graphs(value: str) -> None:
    if value not in CUDA_GRAPHS_CHOICES:
        raise ConfigError(f"unknown --cuda-graphs {value!r}; choose from {', '.join(CUDA_GRAPHS_CHOICES)}")


def resolve_cuda_graphs(value: str, device: torch.device, backend: str) -> bool:
    """Whether a run captures graphs: ``auto`` is on for the torch and triton backends on CUDA; ``on`` on
    a CPU is a ConfigError (one line, exit 2)."""
    check_cuda_graphs(value)
    if value == "off":
        return False
    if device.type != "cuda":
        if value == "on":
            raise ConfigError(f"--cuda-graphs on needs a CUDA device; this run is on {device.type} (use auto or off)")
        return False
    return value == "on" or backend in AUTO_BACKENDS


def bucket_for(rows: int, max_rows: int) -> int | None:
    """The padded batch for ``rows``: the next power of two, capped at ``max_rows`` (the largest batch a
    run makes); None above ``max_rows`` (such a batch runs eagerly)."""
    if rows < 1:
        raise ValueError(f"a batch needs at least one row, got {rows}")
    if rows > max_rows:
        return None
    return min(1 << (rows - 1).bit_length(), max_rows)


def cuda_capture(fn: ForwardFn, static_input: torch.Tensor) -> tuple[Callable[[], None], dict[str, torch.Tensor]]:
    """Warm ``fn`` up on a side stream, then capture one call of it as a CUDA graph."""
    import torch

    current = torch.cuda.current_stream(static_input.device)
    # The first run on the stream that will replay the graph: a backend's plan allocates its buffers
    # there, so the caching allocator ties them to that stream (not to a short-lived side stream).
    fn(static_input)
    side = torch.cuda.Stream(static_input.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):  # as torch's docs do: lazy initialisations happen off the captured stream
        for _ in range(WARMUP_RUNS - 1):
            fn(static_input)
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = fn(static_input)
    return graph.replay, outputs


@dataclass
class _Graph:
    static_input: torch.Tensor
    replay: Callable[[], None]
    outputs: dict[str, torch.Tensor]


class GraphForward:
    """``fn`` through one captured graph per (bucket, row shape, dtype, device); see the module doc."""

    def __init__(
        self, fn: ForwardFn, max_rows: int, *, max_graphs: int = DEFAULT_MAX_GRAPHS, capture: CaptureFn = cuda_capture
    ):
        if max_rows < 1 or max_graphs < 1:
            raise ValueError(f"max_rows and max_graphs must be >= 1, got {max_rows}, {max_graphs}")
        self.fn, self.max_rows, self.max_graphs, self.capture = fn, max_rows, max_graphs, capture
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()  # least recently used first
        self.failed: dict[tuple, str] = {}  # key -> why its capture failed (runs eagerly)
        self.stats = {"captures": 0, "replays": 0, "evictions": 0, "eager": 0, "capture_failures": 0}

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = x.shape[0]
        bucket = bucket_for(rows, self.max_rows)
        key = (bucket, tuple(x.shape[1:]), x.dtype, x.device)
        if bucket is None or key in self.failed:
            self.stats["eager"] += 1
            return self.fn(x)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(key, x)
            if graph is None:
                self.stats["eager"] += 1
                return self.fn(x)
        else:
            self.graphs.move_to_end(key)
        graph.static_input[:rows].copy_(x)
        if rows < bucket:
            graph.static_input[rows:].zero_()  # last batch's padding: zeros, never stale rows of a full batch
        graph.replay()
        self.stats["replays"] += 1
        return {name: t[:rows] for name, t in graph.outputs.items()}

    def _capture(self, key: tuple, x: torch.Tensor) -> _Graph | None:
        bucket = key[0]
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
            self.stats["evictions"] += 1
        import torch

        static_input = torch.zeros((bucket, *x.shape[1:]), dtype=x.dtype, device=x.device)
        try:
            replay, outputs = self.capture(self.fn, static_input)
        except Exception as exc:  # noqa: BLE001  (any capture failure: the forward pass runs eagerly instead)
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.failed[key] = why
            self.stats["capture_failures"] += 1
            log.warning("CUDA graph capture failed for batch bucket %d (%s); running it without a graph", bucket, why)
            return None
        graph = _Graph(static_input, replay, outputs)
        self.graphs[key] = graph
        self.stats["captures"] += 1
        return graph

    def describe(self) -> str:
        s = self.stats
        return (
            f"CUDA graphs: {s['captures']} captured, {s['replays']} replays, {s['evictions']} evicted, "
            f"{s['capture_failures']} capture failures, {s['eager']} eager batches"
        )
