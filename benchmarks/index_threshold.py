"""Where exact search stops paying: faiss flat vs HNSW on 4,096-dim rows, against one forward pass.

``fastfeat serve --index`` searches exactly (IndexFlatIP) below ``--exact-below`` rows and with HNSW
above.  A flat query reads every row (rows × 16 KB of float32), so its latency grows linearly; the
threshold is where one query costs about what the image's own forward pass costs (AlexNet, batch 1,
measured here in the same run), so that search never dominates a neighbours request.

Rows are synthetic but shaped like relu7 features: a mixture of 200 Gaussian clusters in a 256-dim
subspace, rectified (about half the units zero), L2-normalised. HNSW's recall@10 is measured against
the flat results on 200 held-out queries; its build time is reported too (paid once, at start-up).

    python benchmarks/index_threshold.py --sizes 2000,5000,10000,20000,50000

Writes benchmarks/results/index_threshold_<device>.json.  Never run two benchmarks at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from results import device_name, git_sha  # noqa: E402

DIM = 4096


def relu_like(n: int, rng: np.random.Generator, centres: np.ndarray, basis: np.ndarray) -> np.ndarray:
    labels = rng.integers(0, len(centres), n)
    latent = centres[labels] + 0.6 * rng.standard_normal((n, basis.shape[0]), dtype=np.float32)
    x = np.maximum(latent @ basis, 0).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def forward_ms() -> float:
    """p50 of AlexNet fp32 relu7 at batch 1 on this machine (the torch backend, as the server runs it)."""
    import torch

    from fastfeat.backends import make_backend
    from fastfeat.models import get_model
    from fastfeat.weights import load_weights

    spec = get_model("alexnet")
    net = make_backend("torch", spec, load_weights(spec, "random:0").tensors, torch.device("cpu"), torch.float32)
    x = net.prepare(torch.randn(1, 224, 224, 3))
    times = []
    for i in range(23):
        t0 = time.perf_counter()
        net.forward_intermediates(x, ["relu7"])
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def single_query_ms(index, queries: np.ndarray, k: int) -> float:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main() -> None:
    import faiss

    from fastfeat.serve.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,5000,10000,20000,50000")
    ap.add_argument("--hnsw-max", type=int, default=50000, help="largest size HNSW is built for (build time)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((256, DIM), dtype=np.float32) / 16
    centres = rng.standard_normal((200, 256), dtype=np.float32)
    queries = relu_like(200, rng, centres, basis)
    fwd = forward_ms()
    print(f"forward pass, AlexNet fp32 batch 1: {fwd:.1f} ms", flush=True)
    rows = []
    for n in map(int, args.sizes.split(",")):
        data = relu_like(n, rng, centres, basis)
        flat = faiss.IndexFlatIP(DIM)
        flat.add(data)
        row = {"rows": n, "flat_query_ms": single_query_ms(flat, queries[:50], 10)}
        if n <= args.hnsw_max:
            hnsw = faiss.IndexHNSWFlat(DIM, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            t0 = time.perf_counter()
            hnsw.add(data)
            row["hnsw_build_s"] = round(time.perf_counter() - t0, 2)
            hnsw.hnsw.efSearch = HNSW_EF_SEARCH
            row["hnsw_query_ms"] = single_query_ms(hnsw, queries[:50], 10)
            _, truth = flat.search(queries, 10)
            _, found = hnsw.search(queries, 10)
            row["hnsw_recall_at_10"] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)]))  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        del data, flat
    exact_ok = [r["rows"] for r in rows if r["flat_query_ms"] <= fwd]
    report = {
        "what": "single-query latency of faiss IndexFlatIP vs IndexHNSWFlat on 4096-dim relu-like rows, k=10",
        "machine": device_name("cpu"),
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "hnsw": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH},
        "forward_ms_alexnet_fp32_b1": round(fwd, 2),
        "sizes": rows,
        "largest_exact_within_one_forward_pass": max(exact_ok) if exact_ok else None,
        "git_sha": git_sha(),
    }
    path = args.json or os.path.join(os.path.dirname(__file__), "results", "index_threshold_cpu.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"largest size with a flat query within one forward pass ({fwd:.1f} ms): "
          f"{report['largest_exact_within_one_forward_pass']}; wrote {path}")  # fmt: skip


if __name__ == "__main__":
    main()
