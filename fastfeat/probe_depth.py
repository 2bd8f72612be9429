"""``fastfeat probe DIR --layer pool5,fc6,relu6,fc7,relu7 --chart depth.png``: accuracy by depth.

DeCAF (Donahue et al. 2014, Table 4 / Figure 5) and Yosinski et al. (2014) ask how a linear probe's
accuracy changes from layer to layer.  This runs :func:`fastfeat.probe.run_probe` once per layer,
unchanged: the same splits (they depend on the labels and the seed only, so every layer is scored
on the same training and test images) and, with ``--C auto``, each layer's own C chosen on held-out
training rows in each split.  The layers keep the order given, which is read as depth (shallow
first): the chart's x axis.

Outputs: one table (a row per layer: mean per-class accuracy ± std over the splits, overall
accuracy, the C chosen in each split), one JSON (``{"layers": [row per layer], "reports": {layer:
run_probe's report}}``) and, with ``chart``, a plot of mean per-class accuracy against layer with
± one standard deviation over the splits as error bars, and chance as a dashed line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from .data import DataError, Shards
from .probe import ProbeError, run_probe

CHART_SUFFIXES = (".png", ".pdf", ".svg")


def parse_layers(value: str) -> list[str]:
    layers = [name.strip() for name in value.split(",") if name.strip()]
    if not layers:
        raise ProbeError("--layer names no layer")
    if len(set(layers)) != len(layers):
        raise ProbeError(f"--layer names a layer twice: {value}")
    return layers


def check_chart(chart: str | None) -> None:
    """Fail before the work: a .png/.pdf/.svg in an existing folder, and matplotlib present."""
    if chart is None:
        return
    if not chart.lower().endswith(CHART_SUFFIXES):
        raise ProbeError(f"--chart must end in .png, .pdf or .svg, got {chart!r}")
    folder = os.path.dirname(os.path.abspath(chart))
    if not os.path.isdir(folder):
        raise ProbeError(f"folder of --chart does not exist: {folder}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ProbeError("--chart needs matplotlib: pip install 'fastfeat[plot]'") from None


def run_depth(path: str, layers: list[str], log: Callable[[str], None] | None = None, **probe_options) -> dict:
    """run_probe per layer, in the given order; returns ``{"layers": [rows], "reports": {layer: report}}``."""
    try:  # every layer checked before the first probe: a typo in the last one must not cost the others' time
        Shards(path).check_layers(layers)
    except DataError as exc:
        raise ProbeError(str(exc)) from None
    say = log or (lambda _line: None)
    reports, rows = {}, []
    for depth, layer in enumerate(layers):
        say(f"layer {layer} ({depth + 1}/{len(layers)})")
        report = run_probe(path, layer, log=log, **probe_options)
        reports[layer] = report
        rows.append({
            "depth": depth, "layer": layer,
            "mean_class_accuracy": report["mean_class_accuracy"]["mean"],
            "mean_class_accuracy_std": report["mean_class_accuracy"]["std"],
            "accuracy": report["accuracy"]["mean"], "accuracy_std": report["accuracy"]["std"],
            "C_per_split": [s["C"] for s in report["per_split"]], "chance": report["chance"],
            "splits": report["splits"], "not_converged_fits": report["not_converged_fits"],
        })  # fmt: skip
    first = reports[layers[0]]
    return {
        "dir": first["dir"], "model": first["model"], "classifier": first["classifier"], "C": first["C"],
        "splits": first["splits"], "train_per_class": first["train_per_class"], "chance": first["chance"],
        "layers": rows, "reports": reports,
        "warnings": sorted({w for r in reports.values() for w in r["warnings"]}),
    }  # fmt: skip


def format_depth(r: dict) -> str:
    lines = [
        f"{r['dir']}  ({r['model']})  {r['classifier']}, C {r['C']}, {r['train_per_class']} train per class, "
        f"{r['splits']} splits; chance {r['chance']:.2%}",
        "",
        f"{'layer':>8}  {'mean per-class acc':>18}  {'overall acc':>16}  C per split",
    ]
    for row in r["layers"]:
        cs = ",".join(f"{c:g}" for c in row["C_per_split"])
        lines.append(
            f"{row['layer']:>8}  {row['mean_class_accuracy']:>9.2%} ± {row['mean_class_accuracy_std']:.2%}"
            f"  {row['accuracy']:>7.2%} ± {row['accuracy_std']:.2%}  {cs}"
        )
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


def draw_chart(r: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["layers"]
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 4))
    ax.errorbar(
        xs, [100 * row["mean_class_accuracy"] for row in rows],
        yerr=[100 * row["mean_class_accuracy_std"] for row in rows], marker="o", capsize=4,
        label=f"mean per-class accuracy (± std over {r['splits']} splits)",
    )  # fmt: skip
    ax.axhline(100 * r["chance"], linestyle="--", color="grey", label="chance")
    ax.set_xticks(xs, [row["layer"] for row in rows])
    ax.set_xlabel("layer (shallow → deep)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"linear probe by depth: {r['model']}, {r['classifier']}, C {r['C']}")
    ax.legend(loc="best", fontsize="small")
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def write_json(report: dict, file: str) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


__all__ = ["check_chart", "draw_chart", "format_depth", "parse_layers", "run_depth", "write_json"]
