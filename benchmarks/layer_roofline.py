"""Per-layer kernel table: each fastfeat kernel variant against cuDNN/cuBLAS (torch eager) and torch.compile.

One row per (model, batch, layer, provider): milliseconds (CUDA events, median of ``repeat`` timed
bursts), TFLOP/s for convs and GEMMs or GB/s for pool(+LRN), and the share of the device's roofline
(the time the layer's FLOPs or its compulsory bytes need at peak, over the time measured), plus the
relative error of the kernel's output against torch eager's. Providers:

* ``triton``: the launcher the backend uses (conv2d_nhwc, linear with its split-K choice and the reduce
  folded into the GEMM, maxpool2d_nhwc with ReLU and the CaffeNet LRN fused);
* ``triton-s2d`` (conv1): the space-to-depth tap-loop variant (kernels/conv_s2d.py);
* ``triton-rows`` (pools): the row-walking 2-D tile pool(+LRN) variant (kernels/pool_rows.py), with
  the LRN one channel block of next_pow2(C) lanes per pixel;
* ``triton-rows-halo`` (pools with the LRN fused): the same with channel blocks fitted to C (96 -> 32)
  and a channel halo for the LRN window (``lrn_halo=True``);
* ``triton-fitted`` (an LRN that no pool precedes, e.g. CNN-F/M/S): ``lrn_nhwc_fitted``, fitted
  channel blocks and a halo, against ``lrn_nhwc`` (``triton``);
* ``triton-splitk`` (convs whose K the per-image shape segments, ``k_segments`` in the row): the tap-segmented
  conv (kernels/conv_splitk.py): split into (tile, segment) programs at small batch, summed in one program
  per tile at large batch (what it costs there is what this row measures);
* ``triton-splitk-separate`` (fc layers that split K): the same split, reduced by a second launch;
* ``torch``: torch eager, channels_last (cuDNN, cuBLAS, torch's pool and LRN);
* ``compile``: torch.compile of the same torch function (Inductor; ``COMPILE_MODE``).

The layers run on random inputs of the layer's shape (a layer's time does not depend on its values).
``gpu_check.py``'s ``roofline`` step calls ``run_model``; each row is appended and the JSON saved at once.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Dense peaks per GPU name fragment: (16-bit tensor TFLOP/s, HBM TB/s). From the vendors' data sheets
# (SXM parts); a GPU not listed gets no roofline share.
PEAKS = {
    "H200": (989.0, 4.8),
    "H100": (989.0, 3.35),
    "A100": (312.0, 2.0),
}
# torch.compile mode: max-autotune so that Inductor's own Triton GEMM/conv templates compete with cuDNN
# and cuBLAS (in the default mode it calls them itself); no CUDA graphs, for a per-launch time like the rest.
COMPILE_MODE = "max-autotune-no-cudagraphs"


def device_peaks(name: str) -> tuple[float, float] | None:
    """(TFLOP/s, TB/s) of the GPU called ``name``, or None when not known."""
    return next((peak for key, peak in PEAKS.items() if key in name), None)


def time_ms(fn: Callable[[], object], device: torch.device, repeat: int, iters: int) -> float:
    """Median per-call milliseconds over ``repeat`` bursts of ``iters`` calls, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / iters)
        else:
            import time

            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(samples)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float().reshape(-1), want.float().reshape(-1)
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def layer_units(spec, batch: int, dtype: torch.dtype, device: torch.device, tensors: dict) -> list[dict]:
    """One unit per conv, pool(+LRN) and fc layer of ``spec``: its providers' callables and its work.

    A unit: name, kind, flops, bytes (compulsory: input, weight, output once), providers {name: fn}
    where fn() returns the output NHWC (or [M, N]) for the error column, and "reference".
    """
    from fastfeat import kernels
    from fastfeat.kernels import gemm
    from fastfeat.kernels.autotune import sm_count
    from fastfeat.kernels.conv import TAP_LOOP_MIN_CIN
    from fastfeat.kernels.conv_s2d import conv2d_nhwc_s2d, pack_conv_weight_s2d, s2d_eligible
    from fastfeat.kernels.conv_splitk import conv_k_segments
    from fastfeat.kernels.lrn import lrn_nhwc_fitted
    from fastfeat.kernels.pool_rows import maxpool2d_nhwc_rows
    from fastfeat.layers import LRN, Conv, Linear, MaxPool

    gen = torch.Generator().manual_seed(0)
    # torch runs in the kernels' dtype on the GPU; on the CPU (the dry run) in fp32, since several CPU ops
    # (the LRN's avg_pool3d, for one) have no fp16 kernel there.
    tdt = dtype if device.type == "cuda" else torch.float32
    shapes = spec.input_shapes()
    layers = list(spec.layers)
    esize = torch.tensor([], dtype=dtype).element_size()
    units = []
    for i, layer in enumerate(layers):
        in_shape = shapes[layer.name]
        if isinstance(layer, Conv):
            c, h, w = in_shape
            x = torch.randn(batch, h, w, c, generator=gen).to(device=device, dtype=dtype)
            weight = tensors[f"{layer.param_key}.weight"].to(device=device, dtype=dtype)
            bias = tensors[f"{layer.param_key}.bias"].to(device=device, dtype=torch.float32)
            packed = kernels.pack_conv_weight(weight, groups=layer.groups, dtype=dtype)
            geo = dict(kernel_size=layer.kernel, stride=layer.stride, padding=layer.pad)
            x_cl = x.to(tdt).permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last for cuDNN
            w_t, b_t = weight.to(tdt), bias.to(tdt)
            torch_fn = lambda x_cl=x_cl, w_t=w_t, b_t=b_t, layer=layer: F.relu(F.conv2d(
                x_cl, w_t, b_t, stride=layer.stride, padding=layer.pad, groups=layer.groups))  # fmt: skip
            providers = {
                "triton": lambda x=x, packed=packed, bias=bias, geo=geo, g=layer.groups: kernels.conv2d_nhwc(
                    x, packed, bias, groups=g, relu=True, **geo
                )
            }
            out_c, oh, ow = layer.out_shape(in_shape)
            segments, _ = conv_k_segments(oh * ow, c // layer.groups, out_c // layer.groups, layer.groups,
                                          layer.kernel**2, c // layer.groups >= TAP_LOOP_MIN_CIN, sm_count(device))  # fmt: skip
            if segments > 1:  # split into (tile, segment) programs at small batch, summed in-kernel at large
                providers["triton-splitk"] = lambda x=x, packed=packed, bias=bias, geo=geo, g=layer.groups: (
                    kernels.conv2d_nhwc(x, packed, bias, groups=g, relu=True, k_split=True, **geo)
                )
            if s2d_eligible(c, layer.groups, layer.kernel, layer.stride):
                s2d = pack_conv_weight_s2d(weight, stride=layer.stride, dtype=dtype)
                providers["triton-s2d"] = lambda x=x, s2d=s2d, bias=bias, geo=geo: conv2d_nhwc_s2d(
                    x, s2d, bias, relu=True, **geo
                )
            macs = batch * oh * ow * out_c * (c // layer.groups) * layer.kernel**2
            nbytes = (x.numel() + weight.numel() + batch * oh * ow * out_c) * esize
            units.append(dict(name=layer.name, kind="conv", flops=2 * macs, bytes=nbytes, providers=providers,
                              torch=torch_fn, to_nhwc=lambda y: y.permute(0, 2, 3, 1), k_segments=segments))  # fmt: skip
        elif isinstance(layer, MaxPool):
            c, h, w = in_shape
            norm = layers[i + 1] if i + 1 < len(layers) and isinstance(layers[i + 1], LRN) else None
            x = torch.randn(batch, h, w, c, generator=gen).to(device=device, dtype=dtype)
            lrn = None if norm is None else kernels.LRNParams(norm.size, norm.alpha, norm.beta, norm.k)
            geo = dict(kernel_size=layer.kernel, stride=layer.stride, padding=layer.pad, ceil_mode=layer.ceil)
            x_cl = x.to(tdt).permute(0, 3, 1, 2)

            def torch_fn(x_cl=x_cl, layer=layer, norm=norm):
                y = F.max_pool2d(F.relu(x_cl), layer.kernel, layer.stride, layer.pad, ceil_mode=layer.ceil)
                return y if norm is None else F.local_response_norm(y, norm.size, norm.alpha, norm.beta, norm.k)

            providers = {
                "triton": lambda x=x, lrn=lrn, geo=geo: kernels.maxpool2d_nhwc(x, relu=True, lrn=lrn, **geo),
                "triton-rows": lambda x=x, lrn=lrn, geo=geo: maxpool2d_nhwc_rows(
                    x, relu=True, lrn=lrn, lrn_halo=False, **geo
                ),
            }
            if lrn is not None:
                providers["triton-rows-halo"] = lambda x=x, lrn=lrn, geo=geo: maxpool2d_nhwc_rows(
                    x, relu=True, lrn=lrn, lrn_halo=True, **geo
                )
            _, oh, ow = layer.out_shape(in_shape)
            nbytes = (x.numel() + batch * oh * ow * c) * esize
            name = layer.name if norm is None else f"{layer.name}+{norm.name}"
            units.append(dict(name=name, kind="pool", flops=0, bytes=nbytes, providers=providers, torch=torch_fn,
                              to_nhwc=lambda y: y.permute(0, 2, 3, 1)))  # fmt: skip
        elif isinstance(layer, LRN) and not (i > 0 and isinstance(layers[i - 1], MaxPool)):
            # An LRN after a pool is timed fused into it (above); this one runs on its own.
            c, h, w = in_shape
            x = torch.randn(batch, h, w, c, generator=gen).to(device=device, dtype=dtype)
            params = dict(size=layer.size, alpha=layer.alpha, beta=layer.beta, k=layer.k)
            x_cl = x.to(tdt).permute(0, 3, 1, 2)
            torch_fn = lambda x_cl=x_cl, p=params: F.local_response_norm(x_cl, **p)
            providers = {
                "triton": lambda x=x, p=params: kernels.lrn_nhwc(x, **p),
                "triton-fitted": lambda x=x, p=params: lrn_nhwc_fitted(x, **p),
            }
            units.append(dict(name=layer.name, kind="lrn", flops=0, bytes=2 * x.numel() * esize, providers=providers,
                              torch=torch_fn, to_nhwc=lambda y: y.permute(0, 2, 3, 1)))  # fmt: skip
        elif isinstance(layer, Linear):
            k = 1
            for d in in_shape:
                k *= d
            x = torch.randn(batch, k, generator=gen).to(device=device, dtype=dtype)
            weight = tensors[f"{layer.param_key}.weight"].to(device=device, dtype=dtype)
            bias = tensors[f"{layer.param_key}.bias"].to(device=device, dtype=torch.float32)
            packed = kernels.pack_linear_weight(weight, dtype=dtype)
            relu = layer.name != layers[-1].name
            splits = gemm._pick_split_k(batch, layer.out, k, device)
            x_t, w_t, b_t = x.to(tdt), weight.to(tdt), bias.to(tdt)
            torch_fn = lambda x_t=x_t, w_t=w_t, b_t=b_t, relu=relu: (
                F.relu(F.linear(x_t, w_t, b_t)) if relu else F.linear(x_t, w_t, b_t)
            )
            # split_k given explicitly: the JIT kernels run even where the AOT library would take the call.
            providers = {
                "triton": lambda x=x, p=packed, b=bias, r=relu, s=splits: kernels.linear(
                    x, p, b, r, split_k=s, split_k_reduce="fused"
                )
            }
            if splits > 1:
                providers["triton-splitk-separate"] = lambda x=x, p=packed, b=bias, r=relu, s=splits: kernels.linear(
                    x, p, b, r, split_k=s, split_k_reduce="separate"
                )
            nbytes = (x.numel() + weight.numel() + batch * layer.out) * esize
            units.append(dict(name=layer.name, kind="fc", flops=2 * batch * k * layer.out, bytes=nbytes,
                              providers=providers, torch=torch_fn, to_nhwc=lambda y: y, split_k=splits))  # fmt: skip
    return units


def _row(unit: dict, provider: str, ms: float, err: float | None, peaks) -> dict:
    row = {"layer": unit["name"], "kind": unit["kind"], "provider": provider, "ms": round(ms, 5)}
    if unit["flops"]:
        row["tflops"] = round(unit["flops"] / ms / 1e9, 2)
    row["gb_s"] = round(unit["bytes"] / ms / 1e6, 1)
    if peaks is not None:
        peak_tflops, peak_tbs = peaks
        bound_ms = max(unit["flops"] / (peak_tflops * 1e9), unit["bytes"] / (peak_tbs * 1e9))
        row["roofline_ms"] = round(bound_ms, 5)
        row["roofline_share"] = round(bound_ms / ms, 3)
    if err is not None:
        row["rel_err_vs_torch"] = float(f"{err:.3e}")
    if "split_k" in unit:
        row["split_k"] = unit["split_k"]
    if unit.get("k_segments", 1) > 1:
        row["k_segments"] = unit["k_segments"]
    return row


def run_model(spec, batch: int, dtype: torch.dtype, device: torch.device, tensors: dict, *, repeat: int, iters: int,
              with_compile: bool, out_of_budget: Callable[[str], bool], emit: Callable[[dict], None]) -> None:  # fmt: skip
    """Time every unit of ``spec`` at ``batch``: the triton variants and torch eager, then torch.compile.

    ``out_of_budget(unit_label)`` is asked before each layer (True: skip it); ``emit(row)`` gets each row
    as soon as it is measured (the caller saves the JSON there).
    """
    peaks = device_peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    units = layer_units(spec, batch, dtype, device, tensors)
    with torch.inference_mode():
        for unit in units:
            label = f"{spec.name} b{batch} {unit['name']}"
            if out_of_budget(label):
                continue
            want = unit["torch"]()
            ms = time_ms(unit["torch"], device, repeat, iters)
            emit({"model": spec.name, "batch": batch, **_row(unit, "torch", ms, None, peaks)})
            for provider, fn in unit["providers"].items():
                err = _rel_err(fn(), unit["to_nhwc"](want))
                ms = time_ms(fn, device, repeat, iters)
                emit({"model": spec.name, "batch": batch, **_row(unit, provider, ms, err, peaks)})
        if not with_compile:
            return
        for unit in units:
            label = f"{spec.name} b{batch} {unit['name']} compile"
            if out_of_budget(label):
                continue
            compiled = torch.compile(unit["torch"], mode=COMPILE_MODE, dynamic=False)
            err = _rel_err(compiled(), unit["torch"]())
            ms = time_ms(compiled, device, repeat, iters)
            emit({"model": spec.name, "batch": batch, **_row(unit, "compile", ms, err, peaks)})


def format_rows(rows: list[dict]) -> str:
    """A fixed-width table of the rows (model, batch, layer, provider, ms, TFLOP/s, GB/s, roofline share)."""
    lines = [
        f"{'model':<14}{'b':>5} {'layer':<14}{'provider':<24}{'ms':>9}{'TFLOP/s':>9}{'GB/s':>8}{'roof':>7}{'err':>10}"
    ]
    for r in rows:
        lines.append(
            f"{r['model']:<14}{r['batch']:>5} {r['layer']:<14}{r['provider']:<24}{r['ms']:>9.4f}"
            f"{r.get('tflops', ''):>9}{r['gb_s']:>8}{r.get('roofline_share', ''):>7}{r.get('rel_err_vs_torch', ''):>10}"
        )
    return "\n".join(lines)
