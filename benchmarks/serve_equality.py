"""How far a served feature is from ``fastfeat extract``'s for the same image, per precision.

The server's batches hold whatever requests arrived together, so an image's batch company (and the
batch size the backend plans for) differs from extract's fixed batches; on CPU, oneDNN picks its
blocking by batch size and so sums in another order.  Measured here on the same images and weights:

* ``extract_b1``: extract at batch 1 against extract at batch 64 (the effect of batching alone);
* ``alone``: each image in its own request, one after the other (batches of 1);
* ``concurrent``: every image in its own request, all at once (coalesced into mixed batches);
* ``multipart7``: requests of 7 images each (batches of 7, a size extract never uses here).

Per precision and composition: max, p99 and median of ||served - extracted|| / ||extracted|| per
image (relu7, float32 output), and the largest absolute difference.  Loopback only; bounded.

    python benchmarks/serve_equality.py --count 64

Writes benchmarks/results/serve_equality_<device>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from make_corpus import make_corpus  # noqa: E402
from results import device_name, git_sha  # noqa: E402
from serve_helpers import ServerProcess, extract_rows, rel_err  # noqa: E402

import fastfeat  # noqa: E402

MODEL, WEIGHTS, LAYER = "alexnet", "random:0", "relu7"


def _post(client, url: str, files: list[str]) -> dict:
    if len(files) == 1:
        r = client.post(url, content=open(files[0], "rb").read(), params={"id": os.path.basename(files[0])})
    else:
        r = client.post(url, files=[("image", (os.path.basename(f), open(f, "rb"))) for f in files])
    r.raise_for_status()
    return {im["id"]: np.asarray(im["features"][LAYER], np.float32) for im in r.json()["images"]}


def _stats(errs: list[float], absdiff: float) -> dict:
    e = np.asarray(errs)
    return {"images": len(e), "max": float(e.max()), "p99": float(np.percentile(e, 99)),
            "median": float(np.median(e)), "max_abs_diff": absdiff}  # fmt: skip


def _compare(served: dict, ref: dict) -> dict:
    errs = [rel_err(served[k], ref[k]) for k in served]
    absdiff = max(float(np.abs(served[k] - ref[k]).max()) for k in served)
    return _stats(errs, absdiff)


def measure(precision: str, corpus: str, files: list[str], work: str) -> dict:
    import httpx

    outs = {}
    for batch in (64, 1):
        out = os.path.join(work, f"{precision}-b{batch}")
        fastfeat.extract(corpus, out, model=MODEL, weights=WEIGHTS, layers=[LAYER], batch_size=batch, device="cpu",
                         precision=precision, dtype="float32", format="npy", progress=False)  # fmt: skip
        outs[batch] = {os.path.basename(k): v for k, v in extract_rows(out, LAYER).items()}
    ref = outs[64]
    result = {"extract_b1": _compare(outs[1], ref)}
    server = ServerProcess("--model", MODEL, "--weights", WEIGHTS, "--layers", LAYER, "--precision", precision,
                           "--device", "cpu", "--max-batch", "64", "--max-delay-ms", "20")  # fmt: skip
    try:
        url = server.url + "/v1/features"
        with httpx.Client(timeout=300) as client:
            alone = {}
            for f in files:
                alone.update(_post(client, url, [f]))
            result["alone"] = _compare(alone, ref)
            with concurrent.futures.ThreadPoolExecutor(len(files)) as pool:
                together = {}
                for part in pool.map(lambda f: _post(client, url, [f]), files):
                    together.update(part)
            result["concurrent"] = _compare(together, ref)
            groups = {}
            for i in range(0, len(files), 7):
                groups.update(_post(client, url, files[i : i + 7]))
            result["multipart7"] = _compare(groups, ref)
    finally:
        server.stop()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus")
        make_corpus(corpus, args.count)
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(corpus) for f in names if f.endswith(".jpg"))
        report = {
            "what": "relative L2 error per image of served relu7 features against fastfeat extract (batch 64)",
            "model": MODEL, "weights": WEIGHTS, "layer": LAYER, "images": len(files),
            "machine": device_name("cpu"), "git_sha": git_sha(),
            "precisions": {p: measure(p, corpus, files, work) for p in args.precisions.split(",")},
        }  # fmt: skip
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    path = args.json or os.path.join(os.path.dirname(__file__), "results", "serve_equality_cpu.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    for p, r in report["precisions"].items():
        for comp, s in r.items():
            print(f"{p:5s} {comp:11s} max {s['max']:.2e}  p99 {s['p99']:.2e}  median {s['median']:.2e}  "
                  f"max |diff| {s['max_abs_diff']:.2e}")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
