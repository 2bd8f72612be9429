"""End-to-end throughput: ``fastfeat extract`` against the textbook pipeline and its two ceilings, in one run.

Compared, on the same JPEG corpora (benchmarks/make_corpus.py: ImageNet-like, and with ``--large``
2-12 megapixel photos) and the same weights, interleaved, repeated:

* textbook   : PIL decode + torchvision Resize/CenterCrop/Normalize in a torch DataLoader
               with worker processes, eager fp32 torchvision AlexNet, relu6+relu7 to numpy;
* fastfeat   : ``fastfeat.extract`` with its defaults (DALI, torch backend, default precision and
               decode mode), relu6+relu7 to Parquet; its start-up time (command to first batch) too;
* ceilings   : decode-only (fastfeat's reader + its default ``Decoder``, all cores) and model-only
               (fastfeat's default forward, all cores), and their combination 1/(1/decode + 1/model):
               the rate if the cores did one then the other with no loss;
* compiled   : the model-only rate of ``torch.compile`` with freezing (the ``compile`` backend: the
               same ops, Inductor-fused, weights pre-packed), the best CPU engine fastfeat has to beat.

    python benchmarks/e2e.py --count 512 --large-count 192 --repeats 3
    python benchmarks/e2e.py --model resnet50        # torchvision:resnet50, its pooled feature (flatten)

``--model resnet50``: fastfeat runs ``--model torchvision:resnet50 --layers flatten`` (preprocessing from
ResNet50_Weights.DEFAULT.transforms(): resize 232, crop 224); the textbook pipeline is that transforms()
object in the DataLoader and torchvision's resnet50 eager up to ``flatten``.

Writes benchmarks/results/e2e_<device>.json (``e2e_<device>_resnet50.json`` for ResNet-50) and appends to benchmarks/results/results.csv.
Never run two benchmarks at once on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from functools import partial

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from make_corpus import make_corpus, make_large_corpus  # noqa: E402
from results import append, device_name, git_sha, percentiles  # noqa: E402

import fastfeat  # noqa: E402
from fastfeat.decode import (
    Decoder,  # noqa: E402
    read_image,  # noqa: E402
)
from fastfeat.model_lookup import make_model_backend  # noqa: E402
from fastfeat.model_lookup import resolve_model as get_model  # noqa: E402
from fastfeat.runtime import default_precision  # noqa: E402
from fastfeat.sources import list_items  # noqa: E402
from fastfeat.weights import load_weights  # noqa: E402

MODEL, WEIGHTS, LAYERS = "alexnet", "random:0", ["relu6", "relu7"]
# --model: (fastfeat's model name, the layers both pipelines compute)
BENCH_MODELS = {"alexnet": ("alexnet", ["relu6", "relu7"]), "resnet50": ("torchvision:resnet50", ["flatten"])}


class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, paths):
        from torchvision import transforms

        self.paths = paths
        if MODEL == "torchvision:resnet50":  # the library's own preprocessing of the architecture
            from torchvision.models import ResNet50_Weights

            self.tf = ResNet50_Weights.DEFAULT.transforms()
            return
        self.tf = transforms.Compose(
            [
                transforms.Resize(256),
                transforms.CenterCrop(224),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB"))


def textbook_resnet50(paths, state, batch_size, workers) -> float:
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    net.load_state_dict(state)
    net.eval()
    body = torch.nn.Sequential(*list(net.children())[:-1])  # up to avgpool, then flatten
    loader = torch.utils.data.DataLoader(_PILDataset(paths), batch_size=batch_size, num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    with torch.no_grad():
        for x in loader:
            _ = torch.flatten(body(x), 1).numpy()
            n += len(x)
    return n / (time.perf_counter() - t0)


def textbook(paths, state, batch_size, workers) -> float:
    if MODEL == "torchvision:resnet50":
        return textbook_resnet50(paths, state, batch_size, workers)
    from torchvision.models import alexnet

    net = alexnet(weights=None)
    net.load_state_dict(state)
    net.eval()
    loader = torch.utils.data.DataLoader(_PILDataset(paths), batch_size=batch_size, num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    with torch.no_grad():
        for x in loader:
            h = torch.flatten(net.avgpool(net.features(x)), 1)
            relu6 = net.classifier[2](net.classifier[1](h))
            relu7 = net.classifier[5](net.classifier[4](relu6))
            _ = relu6.numpy(), relu7.numpy()
            n += len(x)
    return n / (time.perf_counter() - t0)


def fastfeat_run(corpus, batch_size, precision=None, startup: list | None = None) -> float:
    out = tempfile.mkdtemp(prefix="fastfeat-bench-")
    try:
        s = fastfeat.extract(
            corpus,
            out,
            model=MODEL,
            weights=WEIGHTS,
            layers=LAYERS,
            batch_size=batch_size,
            precision=precision,
            progress=False,
        )
        if startup is not None:
            startup.append(s["startup_s"])
        return s["images_per_s"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def decode_only(items, batch_size) -> float:
    spec = get_model(MODEL)
    dec = Decoder(spec.preprocess, batch_size, torch.device("cpu"))
    t0 = time.perf_counter()
    for i in range(0, len(items), batch_size):
        read = [read_image(it, 10**9) for it in items[i : i + batch_size]]
        dec.decode([r[0] for r in read], [r[1] for r in read])
    return len(items) / (time.perf_counter() - t0)


_NETS: dict = {}


def model_only(weights, batch_size, precision, iters=8, backend="torch") -> float:
    spec = get_model(MODEL)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    net = _NETS.get((backend, precision))
    if net is None:  # built (and compiled) once: the rate is the steady state's
        net = _NETS[backend, precision] = make_model_backend(backend, spec, weights, torch.device("cpu"), dtype)
    x = torch.randn(batch_size, spec.input_size, spec.input_size, 3, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        net.forward_intermediates(net.prepare(x), LAYERS)
    t0 = time.perf_counter()
    for _ in range(iters):
        net.forward_intermediates(net.prepare(x), LAYERS)
    return batch_size * iters / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description="end-to-end throughput, fastfeat vs textbook and its ceilings")
    ap.add_argument("--corpus", default=None, help="existing ImageNet-like corpus folder (default: generate one)")
    ap.add_argument("--large-corpus", default=None, help="existing large-photo corpus folder (default: generate one)")
    ap.add_argument("--count", type=int, default=512)
    # 192 = 3 batches of 64: with fewer than two batches the decoder never works while the network runs.
    ap.add_argument("--large-count", type=int, default=192, help="0: skip the large-photo corpus")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", choices=tuple(BENCH_MODELS), default="alexnet")
    args = ap.parse_args()
    global MODEL, LAYERS
    MODEL, LAYERS = BENCH_MODELS[args.model]

    made = []
    corpora = {}
    for name, given, count, maker in (("imagenet-like", args.corpus, args.count, make_corpus),
                                      ("large 2-12MP", args.large_corpus, args.large_count, make_large_corpus)):  # fmt: skip
        if not count and not given:
            continue
        folder = given or tempfile.mkdtemp(prefix="fastfeat-corpus-")
        stats = maker(folder, count) if not given else {"path": folder}
        made += [] if given else [folder]
        corpora[name] = (folder, stats)
    weights = load_weights(get_model(MODEL), WEIGHTS).tensors
    precision = default_precision(torch.device("cpu"))
    model_runs = {
        f"ceiling: model only (fastfeat torch {precision})": lambda: model_only(weights, args.batch_size, precision),
        f"compiled model (torch.compile+freezing {precision})": lambda: model_only(
            weights, args.batch_size, precision, backend="compile"
        ),
    }
    result = {
        "benchmark": f"end-to-end img/s, {MODEL} {'+'.join(LAYERS)}, batch {args.batch_size}",
        "device": device_name("cpu"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "lscpu_model": _cpu_model(),
        },  # fmt: skip
        "git_sha": git_sha(),
        "date": datetime.date.today().isoformat(),
        "precision": precision,
        "repeats": args.repeats,
        "load_before": os.getloadavg()[0],
        "corpora": {},
    }
    rows = []
    model_samples: dict[str, list[float]] = {k: [] for k in model_runs}
    for fn in model_runs.values():
        fn()  # warm-up, and the compiled model's compilation, outside the timings
    for cname, (folder, stats) in corpora.items():
        items = list_items(folder)
        paths = [it.path for it in items]
        startup: list[float] = []
        # The textbook pipeline's DataLoader workers and fastfeat compete for the same cores:
        # run the candidates interleaved, repeat, and report percentiles over repeats.
        runs = {
            "textbook (PIL+DataLoader, eager fp32)": partial(textbook, paths, weights, args.batch_size, args.workers),
            f"fastfeat extract ({precision})": partial(fastfeat_run, folder, args.batch_size, startup=startup),
            "ceiling: decode only (reader + DALI cpu)": partial(decode_only, items, args.batch_size),
            **model_runs,
        }
        samples: dict[str, list[float]] = {k: [] for k in runs}
        fastfeat_run(folder, args.batch_size)  # warm-up: first DALI/oneDNN initialisation, page cache
        for rep in range(args.repeats):
            for name, fn in runs.items():
                samples[name].append(fn())
                print(f"{cname} rep {rep} {name}: {samples[name][-1]:.1f} img/s", file=sys.stderr)
        for name in model_runs:
            model_samples[name] += samples[name]
        summary = {name: dict(zip(("p20", "p50", "p80"), percentiles(v), strict=True)) for name, v in samples.items()}
        p50 = {name: v["p50"] for name, v in summary.items()}
        decode = p50["ceiling: decode only (reader + DALI cpu)"]
        model = p50[f"ceiling: model only (fastfeat torch {precision})"]
        combined = 1 / (1 / decode + 1 / model)
        fast = p50[f"fastfeat extract ({precision})"]
        result["corpora"][cname] = {
            "corpus": stats,
            "count": len(items),
            "img_per_s": summary,
            "combined_ceiling_p50": round(combined, 2),
            "fastfeat_share_of_combined_ceiling": round(fast / combined, 3),
            "speedup_vs_textbook_p50": {
                k: round(v / p50["textbook (PIL+DataLoader, eager fp32)"], 2) for k, v in p50.items()
            },
            "startup_s_p50": round(float(np.median(startup)), 3) if startup else None,
        }
        for name, v in summary.items():
            rows.append({"kernel": "extract_e2e", "provider": name, "shape": f"{MODEL} 224, {cname}", "dtype": "",
                         "batch": args.batch_size, "metric": "img/s", "p20": round(v["p20"], 2),
                         "p50": round(v["p50"], 2), "p80": round(v["p80"], 2), "device": result["device"]})  # fmt: skip
    fastfeat_model = float(np.median(model_samples[f"ceiling: model only (fastfeat torch {precision})"]))
    compiled = float(np.median(model_samples[f"compiled model (torch.compile+freezing {precision})"]))
    result["forward_vs_compiled_p50"] = round(fastfeat_model / compiled, 3)
    # Batch 1 (a server's case), interleaved pairs: the FC weights are read once per image there.
    single = {"fastfeat torch": "torch", "torch.compile+freezing": "compile"}
    single_samples: dict[str, list[float]] = {k: [] for k in single}
    for backend in single.values():
        model_only(weights, 1, precision, iters=4, backend=backend)  # the compiled graph for batch 1
    for _ in range(2 * args.repeats):
        for name, backend in single.items():
            single_samples[name].append(model_only(weights, 1, precision, iters=40, backend=backend))
    result["forward_batch1_img_per_s"] = {
        name: dict(zip(("p20", "p50", "p80"), percentiles(v), strict=True)) for name, v in single_samples.items()
    }
    pairs = [a / b for a, b in zip(*single_samples.values(), strict=True)]
    result["forward_batch1_vs_compiled_p50"] = round(float(np.median(pairs)), 3)
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))
    tag = "cuda" if torch.cuda.is_available() else "cpu"
    suffix = "" if args.model == "alexnet" else f"_{args.model}"
    with open(os.path.join(os.path.dirname(__file__), "results", f"e2e_{tag}{suffix}.json"), "w") as f:
        json.dump(result, f, indent=1)
    append(rows)
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


def _cpu_model() -> str:
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")


if __name__ == "__main__":
    main()
