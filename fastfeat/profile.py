"""Per-layer timing of the forward pass: where does the time go (DeCAF, Figure 3)?

``profile`` runs a backend's maximally fused forward plan (``net.plan([deepest])``)
op by op on a random N(0,1) image batch: every op is timed on the real output of
the op before it, so ReLUs see real sign patterns and fc layers real activations,
in the order the forward pass runs them.  Each op is warmed up, then run
``repeat`` times; the result keeps the median and the 20th/80th percentiles.

The result is a list of plain dicts (one per backend × batch size) that
``format_table`` prints, ``write_json`` stores and ``plot_profile`` draws.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch

from .arguments import check_compile_mode
from .backends import backend_names, make_backend, unavailable_reason
from .backends.compile_backend import recorded_mode
from .backends.plan import Op
from .errors import ConfigError
from .graphs import GraphForward, resolve_cuda_graphs
from .model_lookup import resolve_model
from .models import ModelSpec
from .profile_noise import load_average, timing_quality
from .profile_report import TYPE_ORDER, check_outputs, format_table, plot_profile, write_json
from .runtime import PRECISIONS, device_name, git_sha, keep_freed_memory, resolve_device, resolve_precision
from .version import __version__
from .weights import load_weights

DEFAULT_BATCH_SIZES = (1, 64)
INPUT_SEED = 0  # the same random images for every backend, so their op inputs match


# ----------------------------------------------------------------------------------------------
# Argument parsing (shared by the CLI and the Python API)
# ----------------------------------------------------------------------------------------------
def parse_batch_sizes(batch_sizes: str | int | Iterable[int]) -> list[int]:
    """Batch sizes from "1,64,256" or [1, 64]: positive, deduplicated, in the given order."""
    if isinstance(batch_sizes, str):
        parts = [p.strip() for p in batch_sizes.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ConfigError(
                f"batch sizes must be comma-separated positive integers like 1,64,256, got {batch_sizes!r}"
            )
        sizes = [int(p) for p in parts]
    elif isinstance(batch_sizes, int):
        sizes = [batch_sizes]
    else:
        sizes = list(batch_sizes)
    if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {batch_sizes!r}")
    return list(dict.fromkeys(sizes))


def parse_count(text: str | int, what: str, minimum: int) -> int:
    """An integer option (--repeat, --warmup) with a one-line error instead of argparse's usage dump."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be an integer, got {text!r}") from None
    if value < minimum:
        raise ConfigError(f"{what} must be at least {minimum}, got {value}")
    return value


def backend_unavailable(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` here, or None when it can."""
    if name not in backend_names():
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(backend_names())} or all")
    return unavailable_reason(name, device)


def resolve_backends(
    backends: str | Iterable[str], device: torch.device, log: Callable[[str], None] | None = None
) -> list[str]:
    """Backend names to profile; "all" means every backend that can run here.

    Each backend that "all" leaves out is told to ``log``, one line with the reason."""
    names = [n.strip() for n in backends.split(",")] if isinstance(backends, str) else list(backends)
    if not names or not all(names):
        raise ConfigError(f"no backend given; choose from {', '.join(backend_names())} or all")
    resolved: list[str] = []
    for name in names:
        if name == "all":
            for b in backend_names():
                why = backend_unavailable(b, device)
                if why is None:
                    resolved.append(b)
                elif log is not None:
                    log(f"profile: skipping {b}: {why}")
            continue
        why = backend_unavailable(name, device)
        if why is not None:
            raise ConfigError(f"backend {name!r} is not available: {why}")
        resolved.append(name)
    return list(dict.fromkeys(resolved))


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def _time_runs(run: Callable, x: torch.Tensor, repeat: int, device: torch.device) -> tuple[list[float], torch.Tensor]:
    """``repeat`` timings of ``run(x)`` in milliseconds, and the last output."""
    times: list[float] = []
    y = x
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(repeat):
            # Nothing else may be queued before `start`, or its time would be charged to this op.
            torch.cuda.synchronize(device)
            start.record()
            y = run(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            y = run(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return times, y


def _compile_op(op: Op, compile_fn: Callable) -> Callable:
    """torch.compile one op alone, so that every layer keeps its own time.

    All torch ops share the code object of ``TorchNet.run_layer``, and dynamo keeps at most
    8 compiled variants per code object before it silently falls back to eager.  Resetting
    dynamo before each op keeps exactly one entry (the op being timed) and so also no
    guard-evaluation overhead from the others; the failure flag makes a fallback an error
    rather than a quietly eager "compiled" time.
    """
    torch._dynamo.reset()
    return compile_fn(op.run)


@torch.inference_mode()
def time_plan(
    ops: list[Op], x: torch.Tensor, repeat: int, warmup: int, device: torch.device, compile_fn: Callable | None = None
) -> list[tuple[Op, list[float], tuple[int, ...]]]:
    """Time each op on the output of the previous one: [(op, times_ms, output_shape)] in forward order.

    ``compile_fn`` (a backend's ``compile_op``) compiles each op on its own before it is timed.
    """
    timed = []
    # fullgraph=True already forbids graph breaks; this forbids a silent fallback to eager.
    no_fallback = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True) if compile_fn else nullcontext()
    with no_fallback:
        for op in ops:
            run = _compile_op(op, compile_fn) if compile_fn else op.run
            for _ in range(warmup):
                run(x)
            times, y = _time_runs(run, x, repeat, device)
            timed.append((op, times, tuple(y.shape)))
            x = y  # drops the previous input: memory stays at about two activations
    return timed


@torch.inference_mode()
def time_graph_forward(net, names: list[str], x: torch.Tensor, repeat: int) -> float:
    """Median ms of the whole forward pass replayed as one CUDA graph (captured, after its warm-up, first)."""
    graph = GraphForward(partial(net.forward_intermediates, names=names), x.shape[0])
    graph(x)  # capture
    times, _ = _time_runs(graph, x, repeat, x.device)
    return float(np.median(times))


# ----------------------------------------------------------------------------------------------
# Result objects
# ----------------------------------------------------------------------------------------------
def _gflops(macs: int, ms: float) -> float | None:
    """Achieved GFLOP/s (2 FLOPs per MAC); None for ops without arithmetic (relu, pool, norm)."""
    if macs == 0 or ms <= 0:
        return None
    return 2 * macs / (ms * 1e6)


def _layer_record(spec: ModelSpec, op: Op, times: list[float], output_shape: tuple[int, ...], batch: int) -> dict:
    shape = spec.shapes()[op.covers[-1]]
    # Layouts differ between backends (NCHW, NHWC), element counts must not.
    if math.prod(output_shape) != batch * math.prod(shape):  # a backend bug, not a user error
        raise RuntimeError(f"op {op.name} returned {output_shape}, expected {batch} x {shape}")
    per_image_macs = spec.macs()
    macs = sum(per_image_macs[name] for name in op.covers) * batch
    p20, p50, p80 = (float(v) for v in np.percentile(np.asarray(times, dtype=np.float64), [20, 50, 80]))
    return {
        "name": op.name,
        "type": op.kind,
        "covers": list(op.covers),
        "macs": macs,
        "ms_median": p50,
        "ms_p20": p20,
        "ms_p80": p80,
        "percent": 0.0,  # filled in once the total is known
        "shape": list(shape),
        "ms_per_image": p50 / batch,
        "gflops": _gflops(macs, p50),
    }


def _by_type(layers: list[dict], total_ms: float) -> dict[str, dict]:
    """Time and MACs per layer kind.  A fused op counts as the kind of its first layer (conv+relu is conv)."""
    summary = {kind: {"ms": 0.0, "percent": 0.0, "macs": 0, "gflops": None} for kind in TYPE_ORDER}
    for layer in layers:
        entry = summary[layer["type"]]
        entry["ms"] += layer["ms_median"]
        entry["macs"] += layer["macs"]
    for entry in summary.values():
        entry["percent"] = 100.0 * entry["ms"] / total_ms if total_ms > 0 else 0.0
        entry["gflops"] = _gflops(entry["macs"], entry["ms"])
    return summary


def _result(spec, backend, device, precision, batch, timed, repeat, warmup, weights, load=None) -> dict:
    layers = [_layer_record(spec, op, times, shape, batch) for op, times, shape in timed]
    # On a GPU the events time the device, which other CPU jobs do not slow: only the spread counts.
    cores = torch.get_num_threads() if device.type == "cpu" else 10**6
    quality = timing_quality({op.name: times for op, times, _ in timed}, load, cores)
    total_ms = sum(layer["ms_median"] for layer in layers)
    for layer in layers:
        layer["percent"] = 100.0 * layer["ms_median"] / total_ms if total_ms > 0 else 0.0
    total_macs = sum(layer["macs"] for layer in layers)
    return {
        "model": spec.name,
        "backend": backend,
        "device": str(device),
        "device_name": device_name(device, with_threads=True),
        "precision": precision,
        "batch_size": batch,
        "total_ms": total_ms,
        "layers": layers,
        "fastfeat_version": __version__,
        "git_sha": git_sha(),
        "total_macs": total_macs,
        "ms_per_image": total_ms / batch,
        "images_per_s": 1e3 * batch / total_ms if total_ms > 0 else None,
        "gflops": _gflops(total_macs, total_ms),
        "by_type": _by_type(layers, total_ms),
        "repeat": repeat,
        "warmup": warmup,
        "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
        "timing_quality": quality,  # fastfeat.profile_noise: load, spread between repeats, tick clustering
        "weights": weights,
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def profile(
    model: str = "caffenet",
    backends: str | Iterable[str] = ("torch",),
    device: str = "auto",
    precision: str | None = None,
    batch_sizes: str | Iterable[int] = DEFAULT_BATCH_SIZES,
    repeat: int = 10,
    warmup: int = 2,
    weights: str = "random:0",
    log: Callable[[str], None] | None = None,
    cuda_graphs: str = "auto",
    compile_mode: str | None = None,
) -> list[dict]:
    """Per-op timings of the full forward pass: one result dict per (backend, batch size).

    ``backends`` names torch, triton, compile, or all (every one available here).
    ``precision`` defaults to bf16 where the hardware computes it natively, else fp32.
    ``log`` receives one progress line per (backend, batch size).
    ``cuda_graphs`` (auto, on, off; see fastfeat.graphs): where on, each result also holds
    ``graph_forward_ms``, the whole forward pass replayed as one CUDA graph (CUDA events, median).
    ``compile_mode``: torch.compile's mode for the compile backend (its default otherwise).
    """
    spec = resolve_model(model)
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    sizes = parse_batch_sizes(batch_sizes)
    repeat, warmup = parse_count(repeat, "repeat", 1), parse_count(warmup, "warmup", 0)
    names = resolve_backends(backends, dev, log)
    graphs = {name: resolve_cuda_graphs(cuda_graphs, dev, name) for name in names}  # ConfigError: on, on a CPU
    if compile_mode is not None:
        check_compile_mode(compile_mode, "compile" if "compile" in names else names[0])
    tensors = load_weights(spec, weights).tensors
    if getattr(spec, "is_zoo", False):  # a library's module: a per-module table (fastfeat.profile_modules)
        if names != ["torch"] or cuda_graphs == "on" or compile_mode is not None:
            raise ValueError(f"profile of {model} times its modules on --backend torch only, without CUDA graphs")
        from .profile_modules import profile_modules

        keep_freed_memory()
        return profile_modules(spec, tensors, dev, precision, sizes, repeat, warmup, weights, log)
    # The same heap behaviour as `fastfeat extract`: without it every CPU op page-faults its output in.
    keep_freed_memory()

    gen = torch.Generator().manual_seed(INPUT_SEED)
    images = {b: torch.randn(b, spec.input_size, spec.input_size, 3, generator=gen) for b in sizes}
    deepest = spec.layer_names[-1]
    results = []
    for name in names:
        mode = compile_mode if name == "compile" else None
        net = make_backend(name, spec, tensors, dev, PRECISIONS[precision], compile_mode=mode)
        ops = net.plan([deepest])
        # A backend that compiles each op (torch.compile) has it compiled on its own, right before timing.
        compile_fn = net.compile_op if getattr(net, "compiles_each_op", False) else None
        # The first call of a torch.compile'd op or of a Triton kernel on a GPU compiles (and
        # autotunes) it: never time that call, whatever --warmup says.
        jit = compile_fn is not None or (net.compiles_on_first_call and dev.type == "cuda")
        op_warmup = max(warmup, 1) if jit else warmup
        for batch in sizes:
            if log is not None:
                log(f"profiling {spec.name} {name} batch {batch} on {dev} ({precision}, repeat {repeat})")
            load = load_average()  # before timing: our own threads would count in it afterwards
            timed = time_plan(ops, net.prepare(images[batch]), repeat, op_warmup, dev, compile_fn=compile_fn)
            result = _result(spec, name, dev, precision, batch, timed, repeat, op_warmup, weights, load)
            result["cuda_graphs"] = graphs[name]
            result["compile_mode"] = recorded_mode(name, dev.type, compile_mode)
            if graphs[name]:
                result["graph_forward_ms"] = time_graph_forward(net, [deepest], net.prepare(images[batch]), repeat)
            results.append(result)
        del net, ops
        if compile_fn is not None:
            torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


__all__ = ["check_outputs", "format_table", "plot_profile", "profile", "time_plan", "write_json"]
