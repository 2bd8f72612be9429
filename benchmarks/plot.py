"""Draw benchmarks/results/results.csv: p50 bars with p20-p80 error bars, per kernel and provider.

    python benchmarks/plot.py --csv benchmarks/results/results.csv --out benchmarks/results/results.png
    python benchmarks/plot.py --kernel caffenet/ --metric ms --log --out layers.png

One panel per metric (ms and img/s do not share an axis); in a panel, one group of bars per
kernel (with its shape and batch when a kernel was measured at several), one bar per provider.
A key measured more than once keeps its latest row, so re-running a benchmark replaces its bar.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from results import COLUMNS, RESULTS  # noqa: E402

KEY = ("kernel", "provider", "shape", "dtype", "batch", "metric", "device")


def read_rows(path: str, kernel: str | None = None, metric: str | None = None) -> list[dict]:
    """The latest row of every measurement key, optionally only kernels containing ``kernel``."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a results file, missing columns {sorted(missing)}")
        rows = list(reader)
    latest: dict[tuple, dict] = {}
    for row in sorted(rows, key=lambda r: r["date"]):  # ISO dates sort as strings
        if kernel and kernel not in row["kernel"]:
            continue
        if metric and row["metric"] != metric:
            continue
        latest[tuple(row[k] for k in KEY)] = row
    if not latest:
        raise ValueError(f"{path}: no rows match kernel={kernel!r} metric={metric!r}")
    return list(latest.values())


def _group_label(row: dict, varying: set[str]) -> str:
    details = [row[k] for k in ("shape", "dtype") if k in varying and row[k]]
    if "batch" in varying and row["batch"]:
        details.append(f"b{row['batch']}")
    return "\n".join([row["kernel"], " ".join(details)]) if details else row["kernel"]


def plot(rows: list[dict], out: str, log: bool = False) -> None:
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    panels = []
    for metric in metrics:
        mrows = [r for r in rows if r["metric"] == metric]
        # Shape/dtype/batch go into the group label only when they tell the groups apart.
        varying = {k for k in ("shape", "dtype", "batch") if len({r[k] for r in mrows}) > 1}
        several_devices = len({r["device"] for r in mrows}) > 1
        groups = list(dict.fromkeys(_group_label(r, varying) for r in mrows))
        providers = list(dict.fromkeys(r["provider"] + (f" @ {r['device']}" if several_devices else "") for r in mrows))
        panels.append((metric, mrows, varying, several_devices, groups, providers))

    width_in = max(8.0, max(0.35 * len(g) * max(len(p), 1) for _, _, _, _, g, p in panels) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(min(width_in, 60), 4.5 * len(panels)), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (metric, mrows, varying, several_devices, groups, providers) in zip(axes[:, 0], panels, strict=True):
        bar = 0.8 / len(providers)
        x = np.arange(len(groups))
        for i, provider in enumerate(providers):
            cells = {}
            for r in mrows:
                if r["provider"] + (f" @ {r['device']}" if several_devices else "") == provider:
                    cells[_group_label(r, varying)] = (float(r["p20"]), float(r["p50"]), float(r["p80"]))
            p20, p50, p80 = (np.array([cells.get(g, (np.nan,) * 3)[j] for g in groups]) for j in range(3))
            ax.bar(
                x + (i - (len(providers) - 1) / 2) * bar,
                p50,
                bar,
                yerr=np.vstack([p50 - p20, p80 - p50]),
                capsize=2,
                label=provider,
                color=colors[i % 10],
            )
        ax.set_xticks(x, groups, rotation=45 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center")
        ax.set_ylabel(f"{metric} (p50, bars p20-p80)")
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
        devices = ", ".join(sorted({r["device"] for r in mrows}))
        ax.set_title(f"{metric} · {devices}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=RESULTS, help="results file (default benchmarks/results/results.csv)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this text")
    parser.add_argument("--metric", default=None, help="only this metric (ms, img/s, ...)")
    parser.add_argument("--log", action="store_true", help="logarithmic value axis")
    args = parser.parse_args(argv)
    try:
        plot(read_rows(args.csv, args.kernel, args.metric), args.out, log=args.log)
    except (ValueError, OSError) as exc:
        print(f"plot.py: error: {exc}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
