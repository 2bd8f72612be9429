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
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import numpy as np
import torch

from . import __version__
from .backends import make_backend
from .backends.plan import Op
from .models import LAYER_KINDS, ModelSpec, get_model
from .pipeline import PRECISIONS, _git_sha, _keep_freed_memory, default_precision, resolve_device
from .weights import load_weights

BACKEND_NAMES = ("torch", "triton", "compile")
DEFAULT_BATCH_SIZES = (1, 64)
INPUT_SEED = 0  # the same random images for every backend, so their op inputs match
# On CUDA, max-autotune searches Triton templates for every conv/GEMM: the fair opponent for the
# hand-written triton backend.  No CUDA graphs: each op is timed alone, and a graph per op would
# time a replay that the real forward pass never does.  On CPU, max-autotune buys little and
# compiles for minutes.
COMPILE_MODES = {"cuda": "max-autotune-no-cudagraphs", "cpu": None}
# Layer kinds in the order summaries list them: the arithmetic first, then the memory-bound rest.
TYPE_ORDER = ("conv", "fc", "pool", "norm", "relu")
assert set(TYPE_ORDER) == set(LAYER_KINDS)


# ----------------------------------------------------------------------------------------------
# Argument parsing (shared by the CLI and the Python API)
# ----------------------------------------------------------------------------------------------
def parse_batch_sizes(batch_sizes: str | int | Iterable[int]) -> list[int]:
    """Batch sizes from "1,64,256" or [1, 64]: positive, deduplicated, in the given order."""
    if isinstance(batch_sizes, str):
        parts = [p.strip() for p in batch_sizes.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ValueError(
                f"batch sizes must be comma-separated positive integers like 1,64,256, got {batch_sizes!r}"
            )
        sizes = [int(p) for p in parts]
    elif isinstance(batch_sizes, int):
        sizes = [batch_sizes]
    else:
        sizes = list(batch_sizes)
    if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes):
        raise ValueError(f"batch sizes must be positive integers, got {batch_sizes!r}")
    return list(dict.fromkeys(sizes))


def parse_count(text: str | int, what: str, minimum: int) -> int:
    """An integer option (--repeat, --warmup) with a one-line error instead of argparse's usage dump."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value}")
    return value


def backend_unavailable(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` here, or None when it can."""
    if name == "torch":
        return None
    if name == "triton":
        try:
            from .kernels import backend_available, interpreter_active
        except ImportError as exc:
            return f"the triton kernels cannot be imported ({exc})"
        ok, why = backend_available()
        if not ok:
            return why
        if device.type == "cpu" and not interpreter_active():
            return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (CPU interpreter)"
        if importlib.util.find_spec("fastfeat.backends.triton_backend") is None:
            return "fastfeat.backends.triton_backend is not installed"
        return None
    if name == "compile":
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python version"
        if device.type == "cpu":
            # Inductor writes and builds C++ for CPU kernels.
            compilers = [os.environ.get("CXX"), "g++", "clang++"]
            if not any(c and shutil.which(c) for c in compilers):
                return "torch.compile on CPU needs a C++ compiler (g++, clang++ or $CXX)"
        elif importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs the triton package"
        return None
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)} or all")


def resolve_backends(backends: str | Iterable[str], device: torch.device) -> list[str]:
    """Backend names to profile; "all" means every backend that can run here."""
    names = [n.strip() for n in backends.split(",")] if isinstance(backends, str) else list(backends)
    if not names or not all(names):
        raise ValueError(f"no backend given; choose from {', '.join(BACKEND_NAMES)} or all")
    resolved: list[str] = []
    for name in names:
        if name == "all":
            resolved += [b for b in BACKEND_NAMES if backend_unavailable(b, device) is None]
            continue
        why = backend_unavailable(name, device)
        if why is not None:
            raise ValueError(f"backend {name!r} is not available: {why}")
        resolved.append(name)
    return list(dict.fromkeys(resolved))


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


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


def _compile_op(op: Op, device: torch.device) -> Callable:
    """torch.compile one op alone, so that every layer keeps its own time.

    All torch ops share the code object of ``TorchNet.run_layer``, and dynamo keeps at most
    8 compiled variants per code object before it silently falls back to eager.  Resetting
    dynamo before each op keeps exactly one entry (the op being timed) and so also no
    guard-evaluation overhead from the others; the failure flag makes a fallback an error
    rather than a quietly eager "compiled" time.
    """
    torch._dynamo.reset()
    return torch.compile(op.run, mode=COMPILE_MODES.get(device.type), dynamic=False, fullgraph=True)


@torch.inference_mode()
def time_plan(
    ops: list[Op], x: torch.Tensor, repeat: int, warmup: int, device: torch.device, compile_ops: bool = False
) -> list[tuple[Op, list[float], tuple[int, ...]]]:
    """Time each op on the output of the previous one: [(op, times_ms, output_shape)] in forward order."""
    timed = []
    # fullgraph=True already forbids graph breaks; this forbids a silent fallback to eager.
    no_fallback = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True) if compile_ops else nullcontext()
    with no_fallback:
        for op in ops:
            run = _compile_op(op, device) if compile_ops else op.run
            for _ in range(warmup):
                run(x)
            times, y = _time_runs(run, x, repeat, device)
            timed.append((op, times, tuple(y.shape)))
            x = y  # drops the previous input: memory stays at about two activations
    return timed


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


def _result(spec, backend, device, precision, batch, timed, repeat, warmup, weights) -> dict:
    layers = [_layer_record(spec, op, times, shape, batch) for op, times, shape in timed]
    total_ms = sum(layer["ms_median"] for layer in layers)
    for layer in layers:
        layer["percent"] = 100.0 * layer["ms_median"] / total_ms if total_ms > 0 else 0.0
    total_macs = sum(layer["macs"] for layer in layers)
    return {
        "model": spec.name,
        "backend": backend,
        "device": str(device),
        "device_name": device_name(device),
        "precision": precision,
        "batch_size": batch,
        "total_ms": total_ms,
        "layers": layers,
        "fastfeat_version": __version__,
        "git_sha": _git_sha(),
        "total_macs": total_macs,
        "ms_per_image": total_ms / batch,
        "images_per_s": 1e3 * batch / total_ms if total_ms > 0 else None,
        "gflops": _gflops(total_macs, total_ms),
        "by_type": _by_type(layers, total_ms),
        "repeat": repeat,
        "warmup": warmup,
        "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
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
) -> list[dict]:
    """Per-op timings of the full forward pass: one result dict per (backend, batch size).

    ``backends`` names torch, triton, compile, or all (every one available here).
    ``precision`` defaults to bf16 where the hardware computes it natively, else fp32.
    ``log`` receives one progress line per (backend, batch size).
    """
    spec = get_model(model)
    dev = resolve_device(device)
    precision = precision or default_precision(dev)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    sizes = parse_batch_sizes(batch_sizes)
    repeat, warmup = parse_count(repeat, "repeat", 1), parse_count(warmup, "warmup", 0)
    names = resolve_backends(backends, dev)
    tensors = load_weights(spec, weights).tensors
    # The same heap behaviour as `fastfeat extract`: without it every CPU op page-faults its output in.
    _keep_freed_memory()

    gen = torch.Generator().manual_seed(INPUT_SEED)
    images = {b: torch.randn(b, spec.input_size, spec.input_size, 3, generator=gen) for b in sizes}
    deepest = spec.layer_names[-1]
    results = []
    for name in names:
        # "compile" compiles the torch backend's ops; the net itself is the torch one.
        net = make_backend("torch" if name == "compile" else name, spec, tensors, dev, PRECISIONS[precision])
        ops = net.plan([deepest])
        # The first call of a torch.compile'd op or of a Triton kernel on a GPU compiles (and
        # autotunes) it: never time that call, whatever --warmup says.
        jit = name == "compile" or (name == "triton" and dev.type == "cuda")
        op_warmup = max(warmup, 1) if jit else warmup
        for batch in sizes:
            if log is not None:
                log(f"profiling {spec.name} {name} batch {batch} on {dev} ({precision}, repeat {repeat})")
            timed = time_plan(ops, net.prepare(images[batch]), repeat, op_warmup, dev, compile_ops=name == "compile")
            results.append(_result(spec, name, dev, precision, batch, timed, repeat, op_warmup, weights))
        del net, ops
        if name == "compile":
            torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


def check_outputs(json_path: str | None, plot_path: str | None) -> None:
    """Reject output paths that cannot be written, and --plot without matplotlib, before profiling."""
    for path in (json_path, plot_path):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"cannot write {path}: its directory does not exist")
    if plot_path:
        _pyplot()


def write_json(results: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------
_GROUP_COLUMNS = ("ms/batch", "ms/img", "%", "GFLOP/s")


def _fmt_macs(macs: int) -> str:
    if macs == 0:
        return "-"
    return f"{macs / 1e9:.2f}G" if macs >= 1e9 else f"{macs / 1e6:.1f}M"


def _fmt_gflops(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _group_cells(ms: float, batch: int, percent: float, gflops: float | None) -> list[str]:
    return [f"{ms:.3f}", f"{ms / batch:.3f}", f"{percent:.1f}", _fmt_gflops(gflops)]


def _render(rows: list[list[str]], left: int) -> list[str]:
    """Align columns: the first ``left`` columns flush left, the rest flush right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _model_table(results: list[dict]) -> str:
    spec = get_model(results[0]["model"])
    shapes, per_image_macs = spec.shapes(), spec.macs()
    first = results[0]
    precisions = ", ".join(dict.fromkeys(r["precision"] for r in results))
    header = (
        f"{spec.name} on {first['device']} ({first['device_name']}), {precisions}; "
        f"median of {first['repeat']} runs per op after {first['warmup']} warm-up runs"
    )
    fixed = ["layer", "type", "out/img", "MACs/img"]
    groups = [f"{r['backend']} b={r['batch_size']}" for r in results]
    rows = [["", "", "", ""] + [g if i == 0 else "" for g in groups for i in range(len(_GROUP_COLUMNS))]]
    rows.append(fixed + list(_GROUP_COLUMNS) * len(results))

    # Rows are layers, so backends with different fusion line up: a fused op sits on the row of
    # its first layer and the layers it also covers say "(fused)".
    cells_by_layer: list[dict[str, list[str]]] = []
    for r in results:
        cells: dict[str, list[str]] = {}
        for op in r["layers"]:
            cells[op["covers"][0]] = _group_cells(op["ms_median"], r["batch_size"], op["percent"], op["gflops"])
            for name in op["covers"][1:]:
                cells[name] = ["(fused)", "", "", ""]
        cells_by_layer.append(cells)
    for layer in spec.layers:
        row = [layer.name, layer.kind, "x".join(map(str, shapes[layer.name])), _fmt_macs(per_image_macs[layer.name])]
        for cells in cells_by_layer:
            row += cells.get(layer.name, ["", "", "", ""])
        rows.append(row)
    rows.append(["total", "", "", _fmt_macs(spec.total_macs())])
    for r in results:
        rows[-1] += _group_cells(r["total_ms"], r["batch_size"], 100.0, r["gflops"])

    fused = any(len(op["covers"]) > 1 for r in results for op in r["layers"])
    by_type = "by type (a fused op counts as the type of its first layer)" if fused else "by type"
    rows.append([by_type] + [""] * (len(rows[1]) - 1))
    for kind in TYPE_ORDER:
        kind_macs = sum(per_image_macs[layer.name] for layer in spec.layers if layer.kind == kind)
        row = [kind, "", "", _fmt_macs(kind_macs)]
        for r in results:
            entry = r["by_type"][kind]
            row += _group_cells(entry["ms"], r["batch_size"], entry["percent"], entry["gflops"])
        rows.append(row)
    lines = _render(rows, left=3)
    separator = "-" * max(len(line) for line in lines)
    n_layers = len(spec.layers)
    body = lines[:2] + [separator] + lines[2 : 2 + n_layers] + [separator] + lines[2 + n_layers :]
    return "\n".join([header, *body])


def format_table(results: list[dict]) -> str:
    """One row per layer, one column group per (backend, batch size); a table per model."""
    if not results:
        raise ValueError("no profile results to format")
    by_model: dict[str, list[dict]] = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    return "\n\n".join(_model_table(rs) for rs in by_model.values())


# ----------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'fastfeat[plot]'") from None
    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_profile(results: list[dict], path: str) -> None:
    """A DeCAF-Figure-3-style PNG: per (model, backend) a row with each op's share of the forward
    time for every batch size side by side, and the share by layer type.

    Shares rather than milliseconds, because batch 1 and batch 256 differ by orders of
    magnitude in time, while the question the figure answers is where the time goes.
    """
    if not results:
        raise ValueError("no profile results to plot")
    plt = _pyplot()

    panels: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        panels.setdefault((r["model"], r["backend"]), []).append(r)
    n_ops = max(len(r["layers"]) for r in results)
    fig, axes = plt.subplots(
        len(panels),
        2,
        figsize=(13, (0.28 * n_ops + 1.6) * len(panels)),
        gridspec_kw={"width_ratios": [3, 2]},
        squeeze=False,
    )
    colors = plt.get_cmap("tab10").colors
    for (model, backend), (ax_ops, ax_types) in zip(panels, axes, strict=True):
        group = panels[(model, backend)]
        op_names = [op["name"] for op in group[0]["layers"]]
        y = np.arange(len(op_names))
        height = 0.8 / len(group)
        for i, r in enumerate(group):
            share = {op["name"]: op["percent"] for op in r["layers"]}
            label = f"batch {r['batch_size']} ({r['ms_per_image']:.3g} ms/image)"
            ax_ops.barh(
                y + i * height, [share.get(n, 0.0) for n in op_names], height, label=label, color=colors[i % 10]
            )
            ax_types.barh(
                np.arange(len(TYPE_ORDER)) + i * height,
                [r["by_type"][k]["percent"] for k in TYPE_ORDER],
                height,
                label=f"batch {r['batch_size']}",
                color=colors[i % 10],
            )
        ax_ops.set_yticks(y + height * (len(group) - 1) / 2, op_names)
        ax_ops.invert_yaxis()  # forward order, top to bottom
        ax_ops.set_xlabel("% of forward time")
        ax_ops.set_title(f"{model} · {backend}: time per layer")
        ax_ops.legend(loc="lower right", fontsize="small")
        ax_ops.grid(axis="x", alpha=0.3)
        ax_types.set_yticks(np.arange(len(TYPE_ORDER)) + height * (len(group) - 1) / 2, list(TYPE_ORDER))
        ax_types.invert_yaxis()
        ax_types.set_xlabel("% of forward time")
        ax_types.set_title(f"{model} · {backend}: time by layer type")
        ax_types.legend(loc="lower right", fontsize="small")
        ax_types.grid(axis="x", alpha=0.3)
    first = results[0]
    precisions = ", ".join(dict.fromkeys(r["precision"] for r in results))
    backends = ", ".join(dict.fromkeys(r["backend"] for r in results))
    fig.suptitle(f"{first['device_name']} ({first['device']}) · {precisions} · backend {backends}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
