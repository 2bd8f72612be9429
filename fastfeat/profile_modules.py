"""``fastfeat profile --model torchvision:NAME / timm:NAME``: a per-module timing table.

A library model's forward is its own code, not a list of fastfeat's ops, so it is not run op by op as
fastfeat.profile runs the built-in networks.  Instead the whole forward runs (the torch backend's module,
fastfeat.zoo_net), and forward hooks time each module of one level: the model's children, with a
Sequential/ModuleList child (ResNet's ``layer1``, a ViT's ``blocks``, ConvNeXt's ``stages``) split into its
own children.  Those modules do not overlap; what runs between them (a flatten, a residual add at the top
level, a class token concatenated) is the ``(between modules)`` row, the whole forward's time minus theirs.
On CPU a module's time is the wall time between its hooks; on CUDA, events recorded by the hooks.
"""

from __future__ import annotations

import datetime
import time

import numpy as np
import torch

from .runtime import PRECISIONS, device_name, git_sha
from .version import __version__

BETWEEN = "(between modules)"


def timed_modules(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for name, child in module.named_children():
        if isinstance(child, (torch.nn.Sequential, torch.nn.ModuleList)) and len(child) > 0:
            out += [(f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children()]
        else:
            out.append((name, child))
    return out


class _Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


@torch.inference_mode()
def profile_modules(spec, tensors, device, precision, batch_sizes, repeat, warmup, weights, log=None) -> list[dict]:
    """One result dict per batch size: ``modules`` (name, type, output shape, ms median/p20/p80, percent)."""
    from .zoo_net import ZooNet

    net = ZooNet(spec, tensors, device, PRECISIONS[precision])
    clock = _Clock(device)
    modules = timed_modules(net.module)
    marks: dict[str, list] = {}
    shapes: dict[str, list[int]] = {}

    def pre(name):
        return lambda _m, _inputs: marks.setdefault(name, []).append([clock.mark(), None])

    def post(name):
        def hook(_m, _inputs, output):
            marks[name][-1][1] = clock.mark()
            if isinstance(output, torch.Tensor):
                shapes[name] = list(output.shape[1:])

        return hook

    handles = []
    for name, m in modules:
        handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
    gen = torch.Generator().manual_seed(0)
    results = []
    try:
        for batch in batch_sizes:
            if log is not None:
                log(f"profiling {spec.name} torch batch {batch} on {device} ({precision}, repeat {repeat})")
            x = net.prepare(torch.randn(batch, spec.input_size, spec.input_size, 3, generator=gen))
            for _ in range(warmup):
                net.module(x)
            per_module = {name: [] for name, _ in modules}
            totals = []
            for _ in range(repeat):
                marks.clear()
                start = clock.mark()
                net.module(x)
                end = clock.mark()
                totals.append(clock.ms(start, end))
                for name, _ in modules:
                    per_module[name].append(sum(clock.ms(a, b) for a, b in marks.get(name, [])))
            results.append(_result(spec, device, precision, batch, modules, per_module, shapes, totals, repeat,
                                   warmup, weights))  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return results


def _stats(times: list[float]) -> tuple[float, float, float]:
    p20, p50, p80 = (float(v) for v in np.percentile(np.asarray(times, np.float64), [20, 50, 80]))
    return p20, p50, p80


def _result(spec, device, precision, batch, modules, per_module, shapes, totals, repeat, warmup, weights) -> dict:
    total = _stats(totals)[1]
    rows = []
    for name, m in modules:
        if not any(per_module[name]):  # not called by this model's forward (an unused head, say)
            continue
        p20, p50, p80 = _stats(per_module[name])
        rows.append({"name": name, "type": type(m).__name__, "shape": shapes.get(name), "ms_median": p50,
                     "ms_p20": p20, "ms_p80": p80})  # fmt: skip
    between = [t - sum(per_module[n][i] for n, _ in modules) for i, t in enumerate(totals)]
    p20, p50, p80 = _stats(between)
    rows.append({"name": BETWEEN, "type": "", "shape": None, "ms_median": p50, "ms_p20": p20, "ms_p80": p80})
    for row in rows:
        row["percent"] = 100.0 * row["ms_median"] / total if total > 0 else 0.0
    return {
        "model": spec.name, "backend": "torch", "device": str(device),
        "device_name": device_name(device, with_threads=True), "precision": precision, "batch_size": batch,
        "total_ms": total, "ms_per_image": total / batch, "images_per_s": 1e3 * batch / total if total else None,
        "modules": rows, "repeat": repeat, "warmup": warmup,
        "timer": "cuda_events" if device.type == "cuda" else "perf_counter", "weights": weights,
        "fastfeat_version": __version__, "git_sha": git_sha(), "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }  # fmt: skip


def format_module_table(results: list[dict]) -> str:
    out = []
    for r in results:
        out.append(f"{r['model']} torch {r['precision']} batch {r['batch_size']} on {r['device_name']}: "
                   f"{r['total_ms']:.2f} ms ({r['images_per_s']:.1f} img/s), median of {r['repeat']}")  # fmt: skip
        width = max(len(row["name"]) for row in r["modules"])
        for row in r["modules"]:
            shape = "x".join(map(str, row["shape"])) if row["shape"] else ""
            out.append(f"  {row['name']:<{width}}  {row['type']:<22} {shape:<14} {row['ms_median']:>10.3f} ms "
                       f"{row['percent']:>6.1f}%")  # fmt: skip
    return "\n".join(out)
