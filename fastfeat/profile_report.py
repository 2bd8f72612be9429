"""The profile's presentation: the per-layer table, the JSON file and the DeCAF-Figure-3-style chart.

Works on the plain result dicts of ``fastfeat.profile.profile`` and needs no timing code.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .errors import ConfigError
from .models import get_model

# Layer kinds in the order summaries list them: the arithmetic first, then the memory-bound rest
# (every kind of fastfeat.layers.LAYER_KINDS; a test checks).
TYPE_ORDER = ("conv", "fc", "pool", "norm", "relu")


def check_outputs(json_path: str | None, plot_path: str | None) -> None:
    """Reject output paths that cannot be written, and --plot without matplotlib, before profiling."""
    for path in (json_path, plot_path):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ConfigError(f"cannot write {path}: its directory does not exist")
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
        noisy = (r.get("timing_quality") or {}).get("noisy_ops", {})
        for op in r["layers"]:
            cells[op["covers"][0]] = _group_cells(op["ms_median"], r["batch_size"], op["percent"], op["gflops"])
            if op["name"] in noisy:
                cells[op["covers"][0]][0] += "~"
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
    rows.append(["by type"] + [""] * (len(rows[1]) - 1))  # the full heading replaces it after alignment
    for kind in TYPE_ORDER:
        kind_macs = sum(per_image_macs[layer.name] for layer in spec.layers if layer.kind == kind)
        row = [kind, "", "", _fmt_macs(kind_macs)]
        for r in results:
            entry = r["by_type"][kind]
            row += _group_cells(entry["ms"], r["batch_size"], entry["percent"], entry["gflops"])
        rows.append(row)
    lines = _render(rows, left=3)
    heading = len(spec.layers) + 3  # 2 header rows, the layers, the total: a long heading must not widen column 1
    lines[heading] = by_type
    separator = "-" * max(len(line) for line in lines)
    n_layers = len(spec.layers)
    body = lines[:2] + [separator] + lines[2 : 2 + n_layers] + [separator] + lines[2 + n_layers :]
    warnings = []
    for r in results:
        for line in (r.get("timing_quality") or {}).get("warnings", []):
            warnings.append(f"warning ({r['backend']} b={r['batch_size']}): {line}")
    return "\n".join([header, *body, *warnings])


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
        raise ConfigError("--plot needs matplotlib: pip install 'fastfeat[plot]'") from None
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
