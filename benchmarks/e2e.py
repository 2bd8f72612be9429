"""End-to-end throughput: ``fastfeat extract`` against the textbook pipeline, in one run.

Compared, on the same JPEG corpus (benchmarks/make_corpus.py) and the same weights:

* textbook   : PIL decode + torchvision Resize/CenterCrop/Normalize in a torch DataLoader
               with worker processes, eager fp32 torchvision AlexNet, relu6+relu7 to numpy;
* fastfeat   : ``fastfeat.extract`` (DALI, torch backend, default precision), relu6+relu7 to Parquet;
* fastfeat-fp32 : the same at fp32, to separate the pipeline's gain from the precision's;
* ceilings   : decode-only (fastfeat's reader + DALI) and model-only (fastfeat's bf16 forward,
               and eager fp32) on the same batch size.

    python benchmarks/e2e.py --count 640 --repeats 3

Writes benchmarks/results/e2e_<device>.json and appends to benchmarks/results/results.csv.
Never run two benchmarks at once on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from make_corpus import make_corpus  # noqa: E402
from results import append, device_name, percentiles  # noqa: E402

import fastfeat  # noqa: E402
from fastfeat.backends import make_backend  # noqa: E402
from fastfeat.decode import (
    Decoder,  # noqa: E402
    read_image,  # noqa: E402
)
from fastfeat.models import get_model  # noqa: E402
from fastfeat.runtime import default_precision  # noqa: E402
from fastfeat.sources import list_items  # noqa: E402
from fastfeat.weights import load_weights  # noqa: E402

MODEL, WEIGHTS, LAYERS = "alexnet", "random:0", ["relu6", "relu7"]


class _PILDataset(torch.utils.data.Dataset):
    def __init__(self, paths):
        from torchvision import transforms

        self.paths = paths
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


def textbook(paths, state, batch_size, workers) -> float:
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


def fastfeat_run(corpus, batch_size, precision=None) -> float:
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


def model_only(weights, batch_size, precision, iters=8) -> float:
    spec = get_model(MODEL)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    net = make_backend("torch", spec, weights, torch.device("cpu"), dtype)
    x = torch.randn(batch_size, spec.input_size, spec.input_size, 3)
    for _ in range(2):
        net.forward_intermediates(net.prepare(x), LAYERS)
    t0 = time.perf_counter()
    for _ in range(iters):
        net.forward_intermediates(net.prepare(x), LAYERS)
    return batch_size * iters / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description="end-to-end throughput, fastfeat vs textbook")
    ap.add_argument("--corpus", default=None, help="existing corpus folder (default: generate one in a temp dir)")
    ap.add_argument("--count", type=int, default=640)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    corpus = args.corpus or tempfile.mkdtemp(prefix="fastfeat-corpus-")
    corpus_stats = make_corpus(corpus, args.count) if not args.corpus else None
    items = list_items(corpus)
    paths = [it.path for it in items]
    weights = load_weights(get_model(MODEL), WEIGHTS).tensors
    precision = default_precision(torch.device("cpu"))

    # The textbook pipeline's DataLoader workers and fastfeat compete for the same cores:
    # run the candidates interleaved, repeat, and report percentiles over repeats.
    runs = {
        "textbook (PIL+DataLoader, eager fp32)": lambda: textbook(paths, weights, args.batch_size, args.workers),
        f"fastfeat extract ({precision})": lambda: fastfeat_run(corpus, args.batch_size),
        "fastfeat extract (fp32)": lambda: fastfeat_run(corpus, args.batch_size, "fp32"),
        "ceiling: decode only (reader + DALI cpu)": lambda: decode_only(items, args.batch_size),
        f"ceiling: model only (fastfeat torch {precision})": lambda: model_only(weights, args.batch_size, precision),
        "ceiling: model only (fastfeat torch fp32)": lambda: model_only(weights, args.batch_size, "fp32"),
    }
    samples: dict[str, list[float]] = {k: [] for k in runs}
    fastfeat_run(corpus, args.batch_size)  # warm-up: first DALI/oneDNN initialisation, page cache
    for rep in range(args.repeats):
        for name, fn in runs.items():
            samples[name].append(fn())
            print(f"rep {rep} {name}: {samples[name][-1]:.1f} img/s", file=sys.stderr)

    dev = device_name("cpu")
    summary = {name: dict(zip(("p20", "p50", "p80"), percentiles(v), strict=True)) for name, v in samples.items()}
    base = summary["textbook (PIL+DataLoader, eager fp32)"]["p50"]
    result = {
        "benchmark": f"end-to-end img/s, alexnet relu6+relu7, batch {args.batch_size}",
        "device": dev,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "corpus": corpus_stats or {"path": corpus, "count": len(items)},
        "repeats": args.repeats,
        "img_per_s": summary,
        "speedup_vs_textbook_p50": {k: round(v["p50"] / base, 2) for k, v in summary.items()},
    }
    print(json.dumps(result, indent=1))
    tag = "cuda" if torch.cuda.is_available() else "cpu"
    with open(os.path.join(os.path.dirname(__file__), "results", f"e2e_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    append(
        [
            {
                "kernel": "extract_e2e",
                "provider": name,
                "shape": "alexnet 224",
                "dtype": "",
                "batch": args.batch_size,
                "metric": "img/s",
                "p20": round(v["p20"], 2),
                "p50": round(v["p50"], 2),
                "p80": round(v["p80"], 2),
                "device": dev,
            }
            for name, v in summary.items()
        ]
    )
    if not args.corpus:
        shutil.rmtree(corpus, ignore_errors=True)


if __name__ == "__main__":
    main()
