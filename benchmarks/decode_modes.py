"""Decode modes, ``exact`` against ``fast`` and ``dct`` (fastfeat.decode): speed of the decode-only ceiling and
what the mode does to the pixels and the features, in one run, on both corpora.

* speed: fastfeat's reader output (encoded bytes, header sizes) through ``Decoder`` on the CPU,
  interleaved repeats, wall-clock img/s and img per CPU-second (the second is steadier when other
  jobs share the cores: it counts only this process's CPU time, DALI's threads included);
* fidelity: per image ‖mode − exact‖ / ‖exact‖ of the network input and of pool5 and relu7 features
  (random:0 weights: no trained weights can be downloaded here), for CaffeNet (Caffe's warp without
  antialiasing) and AlexNet (torchvision's antialiased resize).

    python benchmarks/make_corpus.py --out /tmp/inet --count 512
    python benchmarks/make_corpus.py --out /tmp/large --count 48 --large
    python benchmarks/decode_modes.py --corpus inet=/tmp/inet --corpus large=/tmp/large

Writes benchmarks/results/decode_modes_cpu.json and appends to results.csv.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from results import append, device_name, git_sha, percentiles  # noqa: E402

from fastfeat.backends import make_backend  # noqa: E402
from fastfeat.decode import Decoder, read_image  # noqa: E402
from fastfeat.models import get_model  # noqa: E402
from fastfeat.sources import list_items  # noqa: E402
from fastfeat.weights import load_weights  # noqa: E402

MODES = ("exact", "fast", "dct")


def read_all(corpus: str, pre) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    reads = [read_image(it, 10**9, pre=pre) for it in list_items(corpus)]
    return [r[0] for r in reads], [r[1] for r in reads]


def decode_rate(decoder: Decoder, data, sizes, batch_size: int) -> tuple[float, float]:
    """(img/s wall, img per CPU-second) of one pass over the corpus."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(data), batch_size):
        decoder.decode(data[i : i + batch_size], sizes[i : i + batch_size])
    return len(data) / (time.perf_counter() - t0), len(data) / (time.process_time() - c0)


def rel_errors(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per-row ‖a − b‖ / ‖b‖."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return ((a - b).norm(dim=1) / b.norm(dim=1)).tolist()


def fidelity(model: str, data, sizes, batch_size: int) -> dict:
    spec = get_model(model)
    net = make_backend("torch", spec, load_weights(spec, "random:0").tensors, torch.device("cpu"), torch.float32)
    errs = {m: {"input": [], "pool5": [], "relu7": []} for m in MODES[1:]}
    decoders = {m: Decoder(spec.preprocess, batch_size, torch.device("cpu"), mode=m) for m in MODES}
    for i in range(0, len(data), batch_size):
        batch = {m: d.decode(data[i : i + batch_size], sizes[i : i + batch_size])[0] for m, d in decoders.items()}
        feats = {m: net.forward_intermediates(net.prepare(b), ["pool5", "relu7"]) for m, b in batch.items()}
        for m in MODES[1:]:
            errs[m]["input"] += rel_errors(batch[m], batch["exact"])
            for layer in ("pool5", "relu7"):
                errs[m][layer] += rel_errors(feats[m][layer], feats["exact"][layer])
    return {
        m: {k: {"mean": float(np.mean(v)), "p50": float(np.median(v)), "max": float(np.max(v))} for k, v in e.items()}
        for m, e in errs.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", action="append", required=True, help="NAME=FOLDER (benchmarks/make_corpus.py)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="alexnet", help="preprocessing of the speed runs")
    args = ap.parse_args()
    corpora = dict(c.split("=", 1) for c in args.corpus)
    pre = get_model(args.model).preprocess
    result = {
        "benchmark": f"decode-only ceiling, {args.model} preprocessing, batch {args.batch_size}, CPU",
        "device": device_name("cpu"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "lscpu_model": _cpu_model()},
        "git_sha": git_sha(),
        "date": datetime.date.today().isoformat(),
        "load_before": os.getloadavg()[0],
        "corpora": {},
    }
    rows = []
    for name, folder in corpora.items():
        data, sizes = read_all(folder, pre)
        megapixels = float(np.mean([w * h for w, h in sizes])) / 1e6
        decoders = {m: Decoder(pre, args.batch_size, torch.device("cpu"), mode=m) for m in MODES}
        for d in decoders.values():  # warm-up: DALI's first run allocates
            d.decode(data[: args.batch_size], sizes[: args.batch_size])
        wall: dict[str, list[float]] = {m: [] for m in MODES}
        cpu: dict[str, list[float]] = {m: [] for m in MODES}
        for rep in range(args.repeats):
            for m, d in decoders.items():  # interleaved: both modes see the same machine state
                w, c = decode_rate(d, data, sizes, args.batch_size)
                wall[m].append(w)
                cpu[m].append(c)
                print(f"{name} rep {rep} {m}: {w:.1f} img/s, {c:.1f} img/cpu-s", file=sys.stderr)
        entry = {"count": len(data), "mean_megapixels": round(megapixels, 2), "modes": {}}
        for m in MODES:
            entry["modes"][m] = {
                "img_per_s": dict(zip(("p20", "p50", "p80"), percentiles(wall[m]), strict=True)),
                "img_per_cpu_s": dict(zip(("p20", "p50", "p80"), percentiles(cpu[m]), strict=True)),
            }
            for metric, samples in (("img/s", wall[m]), ("img/cpu-s", cpu[m])):
                p20, p50, p80 = percentiles(samples)
                rows.append({"kernel": "decode_only", "provider": f"decode {m}", "shape": f"{name} {megapixels:.2f}MP",
                             "dtype": "", "batch": args.batch_size, "metric": metric, "p20": round(p20, 2),
                             "p50": round(p50, 2), "p80": round(p80, 2), "device": result["device"]})  # fmt: skip
        entry["speedup_over_exact_p50"] = {
            m: {
                unit: round(entry["modes"][m][key]["p50"] / entry["modes"]["exact"][key]["p50"], 2)
                for unit, key in (("wall", "img_per_s"), ("cpu", "img_per_cpu_s"))
            }
            for m in MODES[1:]
        }
        entry["fidelity_rel_err"] = {
            model: fidelity(model, data, sizes, args.batch_size) for model in ("alexnet", "caffenet")
        }
        result["corpora"][name] = entry
        print(json.dumps({name: entry}, indent=1), file=sys.stderr)
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))
    with open(os.path.join(os.path.dirname(__file__), "results", "decode_modes_cpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    append(rows)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")


if __name__ == "__main__":
    main()
