"""``fastfeat serve`` under load, against ``fastfeat extract`` on the same images, in one run.

* extract: ``fastfeat.extract`` over the corpus (AlexNet relu7, batch 64, float16, default precision),
  img/s without start-up (its summary's ``images_per_s``);
* saturation: N concurrent clients (default 128, two batches' worth) each send one held photo per
  request (raw body, ``format=npy&dtype=float16``) in a closed loop until every image of the corpus has
  been sent once; img/s = images / wall time.  Interleaved with extract, ``--repeats`` times;
* half load: open-loop Poisson arrivals at half the saturation throughput (p50 of the repeats) for
  ``--half-seconds``; p50/p90/p99 latency (send to last byte of the response);
* the batch-size histogram of each phase, from the server's /metrics (per batch) and from the
  responses' X-Fastfeat-Images headers (per image).

The load generator is a small asyncio HTTP/1.1 client with keep-alive connections, in this process,
on the same cores as the server (so the server's share of the machine is what is left to it); loopback
only, bounded in requests and time.  Never run two benchmarks at once.

    python benchmarks/serve_load.py --count 640 --repeats 3

Writes benchmarks/results/serve_load_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from make_corpus import make_corpus  # noqa: E402
from results import device_name, git_sha, percentiles  # noqa: E402
from serve_helpers import ServerProcess  # noqa: E402

import fastfeat  # noqa: E402

MODEL, WEIGHTS, LAYER, BATCH = "alexnet", "random:0", "relu7", 64
PHASE_TIMEOUT_S = 600  # no phase runs longer, whatever the machine
KEEP_ALIVE_S = 3.0  # a pooled connection idle longer is replaced (uvicorn closes idle ones after 5 s)


class Connection:
    """One keep-alive HTTP/1.1 connection; ``post`` returns (status, headers, body)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        data = await self.reader.readexactly(int(headers.get("content-length", 0)))
        return int(status_line.split()[1]), headers, data

    def close(self) -> None:
        self.writer.close()


def _batch_of(headers: dict[str, str]) -> int:
    return json.loads(headers["x-fastfeat-images"])[0]["batch_size"]


async def _saturate(port: int, images: list[bytes], clients: int, path: str) -> dict:
    """Closed loop: ``clients`` connections, each sends the next image as soon as its last one returns."""
    next_i, latencies, batches, statuses = 0, [], [], {}

    async def client():
        nonlocal next_i
        conn = await Connection.open(port)
        try:
            while next_i < len(images):
                body, next_i = images[next_i], next_i + 1
                t0 = time.perf_counter()
                status, headers, _ = await conn.post(path, body)
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200 and "x-fastfeat-images" in headers:
                    batches.append(_batch_of(headers))
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), PHASE_TIMEOUT_S)
    wall = time.perf_counter() - t0
    return {"images": len(images), "wall_s": wall, "img_per_s": len(images) / wall, "statuses": statuses,
            "latency_ms": _lat(latencies), "image_batch_sizes": batches}  # fmt: skip


async def _open_loop(port: int, images: list[bytes], rate: float, seconds: float, path: str, seed: int = 0) -> dict:
    """Poisson arrivals at ``rate`` per second for ``seconds``; each request on a free pooled connection."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    gaps = rng.exponential(1 / rate, n)
    pool: list[tuple[Connection, float]] = []  # (connection, when it was last used)
    latencies, batches, statuses = [], [], {}

    async def one(i: int):
        conn, last_used = pool.pop() if pool else (None, 0.0)
        if conn is not None and time.perf_counter() - last_used > KEEP_ALIVE_S:
            conn.close()  # the server closes idle connections after uvicorn's 5 s keep-alive
            conn = None
        conn = conn or await Connection.open(port)
        t0 = time.perf_counter()
        status, headers, _ = await conn.post(path, images[i % len(images)])
        latencies.append(time.perf_counter() - t0)
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            batches.append(_batch_of(headers))
        pool.append((conn, time.perf_counter()))

    async def run():
        tasks, start = [], time.perf_counter()
        due = start
        for i, gap in enumerate(gaps):
            due += gap
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        return time.perf_counter() - start

    wall = await asyncio.wait_for(run(), PHASE_TIMEOUT_S)
    for conn, _ in pool:
        conn.close()
    return {"requests": n, "offered_rate": rate, "achieved_img_per_s": n / wall, "wall_s": wall,
            "statuses": statuses, "latency_ms": _lat(latencies), "image_batch_sizes": batches}  # fmt: skip


def _lat(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": round(float(p50), 1), "p90": round(float(p90), 1), "p99": round(float(p99), 1),
            "max": round(float(ms.max()), 1)}  # fmt: skip


def _batch_histogram(url: str) -> dict[str, float]:
    """Cumulative fastfeat_batch_size buckets (le -> batches) from /metrics."""
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("fastfeat_batch_size_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def _per_bucket(before: dict, after: dict) -> dict[str, int]:
    """Batches per bucket (sizes in (previous edge, le]) during a phase."""
    out, prev = {}, 0.0
    for le in sorted(after, key=lambda k: float("inf") if k == "+Inf" else float(k)):
        cum = after[le] - before.get(le, 0.0)
        out[f"<={le}"] = int(cum - prev)
        prev = cum
    return out


def _image_histogram(sizes: list[int]) -> dict[str, int]:
    values, counts = np.unique(np.asarray(sizes), return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}


def extract_img_s(corpus: str, precision: str | None) -> float:
    out = tempfile.mkdtemp(prefix="fastfeat-serve-bench-")
    try:
        s = fastfeat.extract(corpus, out, model=MODEL, weights=WEIGHTS, layers=[LAYER], batch_size=BATCH,
                             precision=precision, dtype="float16", progress=False)  # fmt: skip
        return s["images_per_s"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=640, help="images in the corpus (each sent once per repeat)")
    ap.add_argument("--clients", type=int, default=2 * BATCH)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--half-seconds", type=float, default=30.0)
    ap.add_argument("--max-delay-ms", type=float, default=5.0)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="fastfeat-serve-load-")
    corpus = os.path.join(work, "corpus")
    stats = make_corpus(corpus, args.count)
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(corpus) for f in names)
    images = [open(f, "rb").read() for f in files]
    path = "/v1/features?format=npy&dtype=float16"
    server = ServerProcess("--model", MODEL, "--weights", WEIGHTS, "--layers", LAYER, "--max-batch", str(BATCH),
                           "--max-delay-ms", str(args.max_delay_ms), "--max-queue", str(4 * BATCH),
                           *(["--precision", args.precision] if args.precision else []))  # fmt: skip
    report = {"benchmark": "fastfeat serve vs fastfeat extract, alexnet relu7, same corpus, same run"}
    try:
        meta = json.loads(urllib.request.urlopen(server.url + "/v1/model", timeout=30).read())
        print(f"server up: {meta['precision']} {meta['backend']} on {meta['device_name']}", flush=True)
        extract_img_s(corpus, args.precision)  # warm-up: page cache, DALI/oneDNN first-use costs
        asyncio.run(_saturate(server.port, images[: 4 * BATCH], args.clients, path))
        ex, sat, sat_runs, sat_hist = [], [], [], {}
        for rep in range(args.repeats):
            ex.append(extract_img_s(corpus, args.precision))
            before = _batch_histogram(server.url)
            run = asyncio.run(_saturate(server.port, images, args.clients, path))
            sat_hist = _per_bucket(before, _batch_histogram(server.url))
            sat.append(run["img_per_s"])
            sat_runs.append(run)
            print(f"rep {rep}: extract {ex[-1]:.1f} img/s, serve {sat[-1]:.1f} img/s ({sat[-1] / ex[-1]:.0%}), "
                  f"statuses {run['statuses']}", flush=True)  # fmt: skip
        rate = percentiles(sat)[1] / 2
        before = _batch_histogram(server.url)
        half = asyncio.run(_open_loop(server.port, images, rate, args.half_seconds, path))
        half_hist = _per_bucket(before, _batch_histogram(server.url))
        print(f"half load {rate:.1f}/s: latency {half['latency_ms']}, statuses {half['statuses']}", flush=True)
        json_run = asyncio.run(_saturate(server.port, images, args.clients, "/v1/features?format=json&dtype=float16"))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    ex_p, sat_p = percentiles(ex), percentiles(sat)
    last = sat_runs[-1]
    report.update({
        "machine": device_name("cpu"),
        "platform": platform.platform(),
        "server": {"model": MODEL, "weights": WEIGHTS, "layer": LAYER, "max_batch": BATCH,
                   "max_delay_ms": args.max_delay_ms, "precision": meta["precision"], "backend": meta["backend"],
                   "request": f"one image per request, raw body, {path}"},
        "corpus": stats,
        "clients_at_saturation": args.clients,
        "repeats": args.repeats,
        "extract_img_per_s": {"p20": ex_p[0], "p50": ex_p[1], "p80": ex_p[2], "runs": ex},
        "serve_saturation_img_per_s": {"p20": sat_p[0], "p50": sat_p[1], "p80": sat_p[2], "runs": sat},
        "serve_over_extract_p50": round(sat_p[1] / ex_p[1], 3),
        "serve_over_extract_per_repeat": [round(s / e, 3) for s, e in zip(sat, ex, strict=True)],
        "saturation_latency_ms": last["latency_ms"],
        "saturation_batches_per_size_bucket": sat_hist,
        "saturation_images_per_batch_size": _image_histogram(last["image_batch_sizes"]),
        "half_load": {k: v for k, v in half.items() if k != "image_batch_sizes"}
        | {"batches_per_size_bucket": half_hist, "images_per_batch_size": _image_histogram(half["image_batch_sizes"])},
        "json_format_saturation_img_per_s": round(json_run["img_per_s"], 1),
        "git_sha": git_sha(),
    })  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if "histogram" not in k}, indent=1))
    out = args.json or os.path.join(os.path.dirname(__file__), "results", "serve_load_cpu.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"serve at saturation: {sat_p[1]:.1f} img/s = {sat_p[1] / ex_p[1]:.0%} of extract's {ex_p[1]:.1f} img/s; "
          f"half load p50 {half['latency_ms']['p50']} ms, p99 {half['latency_ms']['p99']} ms; wrote {out}")  # fmt: skip


if __name__ == "__main__":
    main()
