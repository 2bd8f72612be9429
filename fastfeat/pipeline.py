"""``fastfeat.extract``: images -> DALI -> forward pass -> Parquet shards.

Four stages run concurrently, linked by bounded queues, so that the decode of
batch i+1 overlaps the forward pass of batch i and the write of batch i-1, and
memory stays bounded whatever the dataset size:

    read (thread)  : file bytes + header check (size, pixel limit)      -> q_read
    decode (thread): DALI decode/resize/crop/normalise                  -> q_decoded
    forward (main) : backend forward, requested layers to host          -> q_features
    write (thread) : Arrow batches into the current shard, commit shards

Batches never span shards and shard k always holds items [kS, (k+1)S), so the
batch composition, and hence every feature value, is the same on every run,
resumed or not.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import math
import os
import queue
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from . import __version__
from .backends import BACKENDS, make_backend
from .models import ModelSpec, Preprocess, get_model, parse_layers
from .preprocess import Decoder, PreprocessError, geometry, load_mean
from .sources import Item, ItemReader, list_items
from .weights import load_weights
from .writer import OutputDir, ShardWriter, feature_schema, record_batch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OUTPUT_DTYPES = {"float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32)}
DEFAULT_MAX_PIXELS = 100_000_000  # refuse decompression bombs above 100 megapixels (configurable)
QUEUE_DEPTH = 3  # batches in flight between two stages: enough to hide jitter, bounded memory
STAGES = ("read", "decode", "h2d", "forward", "d2h", "write")  # busy time is accounted per stage
THREADS = ("read", "decode", "forward", "write")  # each waits on its queues: idle time per thread
EXIF_ORIENTATION = 0x0112  # values 5-8 rotate by 90 degrees: width and height swap


class ExtractError(ValueError):
    """A bad argument or environment: reported as one line, exit code 2, nothing written."""


# ----------------------------------------------------------------------------------------------
# Argument resolution
# ----------------------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ExtractError(f"--device {device}: CUDA is not available on this machine")
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ExtractError(f"bad device {device!r}; use cuda or cuda:N") from None
        if dev.index is not None and not 0 <= dev.index < torch.cuda.device_count():
            raise ExtractError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise ExtractError(f"unknown device {device!r}; choose auto, cpu or cuda[:N]")


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_precision(device: torch.device) -> str:
    """bf16 where the hardware computes it natively (CPU avx512_bf16/AMX, GPU sm80+), else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _library_versions() -> dict:
    """Versions that can change a feature value: part of the run's configuration."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"fastfeat": __version__, "torch": torch.__version__}
    for dist in ("nvidia-dali-cuda130", "pillow", "triton"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _git_sha() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _keep_freed_memory() -> None:
    """Keep freed activation buffers in the heap instead of returning them to the OS.

    glibc mmaps every block above its threshold and unmaps it on free, so each
    layer of each batch page-faults its output in again; on the 2-core dev box
    that costs ~30% of the CPU forward pass (208 -> 292 img/s, AlexNet bf16 b64).
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------
# Stage plumbing
# ----------------------------------------------------------------------------------------------
_END = object()


@dataclass
class Batch:
    shard: int
    last_in_shard: bool
    items: list[Item]
    encoded: list[np.ndarray | None] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # position -> (stage, message)
    images: torch.Tensor | None = None
    features: dict[str, np.ndarray] | None = None
    good: list[int] = field(default_factory=list)


class _Flow:
    """Stop flag, first error, and per-stage busy time shared by the stage threads."""

    def __init__(self):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.busy = dict.fromkeys(STAGES, 0.0)
        self.wait = dict.fromkeys(THREADS, 0.0)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.stop.set()

    def put(self, q: queue.Queue, item, thread: str) -> bool:
        t0 = time.perf_counter()
        try:
            while not self.stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False
        finally:
            self.wait[thread] += time.perf_counter() - t0

    def get(self, q: queue.Queue, thread: str):
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    return q.get(timeout=0.1)
                except queue.Empty:
                    if self.stop.is_set():
                        return _END
        finally:
            self.wait[thread] += time.perf_counter() - t0

    def thread(self, name: str, target, *args) -> threading.Thread:
        def run():
            try:
                target(*args)
            except BaseException as exc:  # propagate to the main thread
                self.fail(exc)

        t = threading.Thread(target=run, name=f"fastfeat-{name}", daemon=True)
        t.start()
        return t


def read_image(
    item: Item, max_pixels: int, reader: ItemReader | None = None, pre: Preprocess | None = None
) -> tuple[np.ndarray | None, tuple[int, int], tuple[str, str] | None]:
    """Bytes and upright (width, height) of one image, or an error (stage, message).

    Refused from the header alone, before any decoding: more than ``max_pixels`` pixels, or
    (given the preprocessing ``pre``) an aspect ratio so extreme that the resized image would be.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        data = (reader or ItemReader()).read(item)
    except OSError as exc:
        return None, (0, 0), ("read", exc.strerror or str(exc))
    if not data:
        return None, (0, 0), ("read", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                # DALI applies the EXIF orientation: report and resize by the upright size (any format:
                # phone JPEGs are often "MPO" to Pillow).
                if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                    width, height = height, width
    except Image.DecompressionBombError:
        return None, (0, 0), ("header", f"image too large: over --max-pixels {max_pixels} (decompression bomb?)")
    except UnidentifiedImageError:
        return None, (0, 0), ("header", "not a recognised image format")
    except (OSError, SyntaxError, ValueError) as exc:
        return None, (0, 0), ("header", f"unreadable image header: {exc}")
    if width * height > max_pixels:
        return None, (width, height), ("header", f"image too large: {width}x{height} over --max-pixels {max_pixels}")
    if pre is not None:
        rh, rw, _, _ = geometry(pre, width, height)
        if rh * rw > max_pixels:
            message = f"aspect ratio too extreme: {width}x{height} resizes to {rw}x{rh}, over --max-pixels {max_pixels}"
            return None, (width, height), ("header", message)
    return np.frombuffer(data, dtype=np.uint8), (width, height), None


# ----------------------------------------------------------------------------------------------
# The extractor
# ----------------------------------------------------------------------------------------------
class Extractor:
    """Validated configuration of one extraction run; ``run()`` does the work."""

    def __init__(
        self,
        source: str,
        out: str,
        model: str = "caffenet",
        weights: str | None = None,
        layers: str | list[str] | None = None,
        batch_size: int = 64,
        precision: str | None = None,
        device: str = "auto",
        backend: str = "torch",
        shard_size: int = 10_000,
        dtype: str = "float16",
        mean_file: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        num_threads: int | None = None,
        overwrite: bool = False,
        progress: bool = True,
        image_column: str = "image",
        num_shards: int = 1,
        shard_index: int = 0,
    ):
        # Everything is checked before anything is written.
        try:
            self.spec: ModelSpec = get_model(model)
            self.layers = parse_layers(self.spec, layers)
        except (ValueError, KeyError) as exc:
            raise ExtractError(str(exc).strip("'\"")) from None
        if backend not in BACKENDS:
            raise ExtractError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if batch_size < 1:
            raise ExtractError(f"--batch-size must be >= 1, got {batch_size}")
        if shard_size < 1:
            raise ExtractError(f"--shard-size must be >= 1, got {shard_size}")
        if dtype not in OUTPUT_DTYPES:
            raise ExtractError(f"unknown --dtype {dtype!r}; choose float16 or float32")
        if num_threads is not None and num_threads < 1:
            raise ExtractError(f"--threads must be >= 1, got {num_threads}")
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ExtractError(f"--shard-index must be in [0, --num-shards={num_shards}), got {shard_index}")
        if max_pixels < 1:
            raise ExtractError(f"--max-pixels must be >= 1, got {max_pixels}")
        from PIL import Image

        # Pillow refuses headers above 2 x MAX_IMAGE_PIXELS by itself: never below our own limit.
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_pixels)
        if weights is None:
            raise ExtractError("--weights is required: a .pth/.safetensors/.caffemodel file, or random:SEED")
        self.device = resolve_device(device)
        self.precision = precision or default_precision(self.device)
        if self.precision not in PRECISIONS:
            raise ExtractError(f"unknown precision {self.precision!r}; choose fp32, bf16 or fp16")
        if backend == "triton":
            from fastfeat.kernels import backend_available

            ok, why = backend_available()
            if not ok:
                raise ExtractError(why)
        self.items = list_items(source, image_column)  # SourceError (a ValueError) for missing/empty sources
        self.weights = load_weights(self.spec, weights)
        pre = self.spec.preprocess
        self.mean_image = load_mean(mean_file, pre.crop, pre.resize) if mean_file else None
        self.source, self.out, self.backend_name = source, out, backend
        self.batch_size, self.shard_size, self.dtype = batch_size, shard_size, dtype
        self.max_pixels, self.num_threads, self.progress = max_pixels, num_threads, progress
        self.image_column, self.num_shards, self.shard_index = image_column, num_shards, shard_index

        shapes = self.spec.shapes()
        self.layer_shapes = {n: list(shapes[n]) for n in self.layers}
        self.metadata = {
            "fastfeat_version": __version__,
            "model": self.spec.name,
            "weights": {"source": self.weights.source, "sha256": self.weights.sha256, "random": self.weights.is_random},
            "preprocessing": {
                **pre.to_dict(),
                "mean_file": os.path.abspath(mean_file) if mean_file else None,
                "mean_sha256": _sha256_array(self.mean_image) if self.mean_image is not None else None,
                "decoder": "nvidia-dali " + ("mixed (nvJPEG)" if self.device.type == "cuda" else "cpu"),
            },
            "precision": self.precision,
            "backend": backend,
            "device": self.device.type,
            "device_name": _device_name(self.device),
            "dtype": dtype,
            "layers": self.layer_shapes,
            "layer_order": "C,H,W (conv layers flattened in C×H×W order)",
            "versions": _library_versions(),
        }
        ids_labels = hashlib.sha256("\n".join(f"{it.id}\t{it.label}" for it in self.items).encode()).hexdigest()
        # Everything that changes a row, a shard boundary or a shard's metadata: a resumed run must
        # match on all of it, or it could mix shards that differ from a clean run's.
        self.config = {
            "source": os.path.abspath(source),
            "items": len(self.items),
            "ids_labels_sha256": ids_labels,
            "layers": self.layers,
            "batch_size": batch_size,
            "shard_size": shard_size,
            "max_pixels": max_pixels,
            "image_column": image_column,
            "metadata": self.metadata,
        }
        self.output = OutputDir(out, self.config, overwrite=overwrite)

    # -- stages -------------------------------------------------------------------------------------
    def _batches(self):
        n_shards = math.ceil(len(self.items) / self.shard_size)
        for shard in range(self.shard_index, n_shards, self.num_shards):  # this part's output shards
            if shard in self.output.shards:
                continue
            lo, hi = shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.items))
            for start in range(lo, hi, self.batch_size):
                end = min(start + self.batch_size, hi)
                yield Batch(shard, end == hi, self.items[start:end])

    def _read_stage(self, flow: _Flow, q_out: queue.Queue) -> None:
        reader = ItemReader(self.image_column)
        for batch in self._batches():
            t0 = time.perf_counter()
            for pos, item in enumerate(batch.items):
                data, size, err = read_image(item, self.max_pixels, reader, self.spec.preprocess)
                batch.encoded.append(data)
                batch.sizes.append(size)
                if err:
                    batch.errors[pos] = err
            flow.busy["read"] += time.perf_counter() - t0
            if not flow.put(q_out, batch, "read"):
                return
        flow.put(q_out, _END, "read")

    def _decode_stage(self, flow: _Flow, decoder: Decoder, q_in: queue.Queue, q_out: queue.Queue) -> None:
        while (batch := flow.get(q_in, "decode")) is not _END:
            t0 = time.perf_counter()
            readable = [i for i in range(len(batch.items)) if i not in batch.errors]
            # Unreadable files keep their slot as a zero image: the batch shape stays that of a clean run.
            images, bad = decoder.decode([batch.encoded[i] for i in readable], [batch.sizes[i] for i in readable])
            for j, msg in bad.items():
                batch.errors[readable[j]] = ("decode", msg)
            batch.good = [i for i in range(len(batch.items)) if i not in batch.errors]
            if images is not None:
                full = images.new_zeros((len(batch.items), *images.shape[1:]))
                full[readable] = images
                batch.images = full
            batch.encoded = []
            flow.busy["decode"] += time.perf_counter() - t0
            if not flow.put(q_out, batch, "decode"):
                return
        flow.put(q_out, _END, "decode")

    def _forward(self, net, batch: Batch, busy: dict[str, float]) -> None:
        """Host->device, forward, device->host; each timed on its own (synchronised on CUDA)."""
        if batch.images is None or not batch.good:
            batch.features = None
            return
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        torch_dtype, _ = OUTPUT_DTYPES[self.dtype]
        t0 = time.perf_counter()
        x = net.prepare(batch.images)
        good = torch.tensor(batch.good, device=self.device)
        sync()
        t1 = time.perf_counter()
        acts = net.forward_intermediates(x, self.layers)
        sync()
        t2 = time.perf_counter()
        feats = {}
        for name in self.layers:
            a = acts[name].index_select(0, good).reshape(len(batch.good), -1)
            feats[name] = a.to(torch_dtype).cpu().numpy()
        batch.features = feats
        batch.images = None
        t3 = time.perf_counter()
        busy["h2d"] += t1 - t0
        busy["forward"] += t2 - t1
        busy["d2h"] += t3 - t2

    def _write_stage(self, flow: _Flow, q_in: queue.Queue, schema, bar) -> None:
        writer: ShardWriter | None = None
        try:
            while (batch := flow.get(q_in, "write")) is not _END:
                t0 = time.perf_counter()
                if writer is None:
                    lo = batch.shard * self.shard_size
                    hi = min(lo + self.shard_size, len(self.items))
                    writer = ShardWriter(self.output, batch.shard, lo, hi, schema)
                writer.add_errors(
                    [{"id": batch.items[p].id, "stage": s, "message": m} for p, (s, m) in sorted(batch.errors.items())]
                )
                if batch.features is not None:
                    rows = [batch.items[i] for i in batch.good]
                    writer.add(
                        record_batch(
                            schema,
                            [it.id for it in rows],
                            [it.label for it in rows],
                            [batch.sizes[i] for i in batch.good],
                            batch.features,
                        )
                    )
                self.rows_written += len(batch.good)
                self.errors_seen += len(batch.errors)
                if batch.last_in_shard:
                    writer.close()
                    writer = None
                flow.busy["write"] += time.perf_counter() - t0
                if bar is not None:
                    bar.update(len(batch.items))
        finally:
            if writer is not None:  # interrupted mid-shard: the partial shard is redone on resume
                writer.abort()

    # -- run ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        _keep_freed_memory()
        net = make_backend(self.backend_name, self.spec, self.weights.tensors, self.device, PRECISIONS[self.precision])
        decoder = Decoder(
            self.spec.preprocess, self.batch_size, self.device, num_threads=self.num_threads, mean_image=self.mean_image
        )
        schema = feature_schema({n: math.prod(s) for n, s in self.layer_shapes.items()}, self.dtype, self.metadata)
        self.output.create()
        n_shards = math.ceil(len(self.items) / self.shard_size)
        mine = range(self.shard_index, n_shards, self.num_shards)
        done_items = sum(r.end_item - r.first_item for k, r in self.output.shards.items() if k in mine)
        todo = sum(min((k + 1) * self.shard_size, len(self.items)) - k * self.shard_size for k in mine) - done_items
        self.rows_written = self.errors_seen = 0

        bar = None
        if self.progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=todo, unit="img", desc="extract", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

        flow = _Flow()
        q_read: queue.Queue = queue.Queue(QUEUE_DEPTH)
        q_decoded: queue.Queue = queue.Queue(QUEUE_DEPTH)
        q_features: queue.Queue = queue.Queue(QUEUE_DEPTH)
        t_start = time.perf_counter()
        threads: list[threading.Thread] = []
        try:
            threads += [
                flow.thread("read", self._read_stage, flow, q_read),
                flow.thread("decode", self._decode_stage, flow, decoder, q_read, q_decoded),
                flow.thread("write", self._write_stage, flow, q_features, schema, bar),
            ]
            while (batch := flow.get(q_decoded, "forward")) is not _END:
                self._forward(net, batch, flow.busy)
                if not flow.put(q_features, batch, "forward"):
                    break
            flow.put(q_features, _END, "forward")
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.1)
        except BaseException as exc:  # KeyboardInterrupt included: stop the stages, keep finished shards
            flow.fail(exc)
        finally:
            for t in threads:
                t.join()
            if bar is not None:
                bar.close()
        if flow.error is not None:
            raise flow.error
        wall = time.perf_counter() - t_start
        complete = self.output.finish(n_shards)
        summary = {
            "images": len(self.items),
            "part": f"{self.shard_index}/{self.num_shards}",
            "processed": todo,
            "skipped_already_done": done_items,
            "rows_written": self.rows_written,
            "errors": self.errors_seen,
            "wall_s": round(wall, 3),
            "images_per_s": round(todo / wall, 2) if wall > 0 else None,
            "stage_busy_s": {k: round(v, 3) for k, v in flow.busy.items()},
            "thread_wait_s": {k: round(v, 3) for k, v in flow.wait.items()},
            "complete": complete,
            "out": os.path.abspath(self.out),
            "model": self.spec.name,
            "backend": self.backend_name,
            "device": str(self.device),
            "precision": self.precision,
            "batch_size": self.batch_size,
            "fastfeat_version": __version__,
            "git_sha": _git_sha(),
        }
        self.output.write_summary(summary)
        return summary


def _sha256_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def extract(source: str, out: str, **kwargs) -> dict:
    """Extract features of every image of ``source`` into Parquet shards in ``out``.

    Mirrors ``fastfeat extract``; keyword arguments are those of :class:`Extractor`.
    Returns the run summary (also written to ``out/summary.json``).
    """
    return Extractor(source, out, **kwargs).run()


def format_summary(summary: dict) -> str:
    busy = summary["stage_busy_s"]
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in busy.items())
    waits = ", ".join(f"{k} {v:.2f}s" for k, v in summary["thread_wait_s"].items())
    return (
        f"{summary['processed']} images ({summary['rows_written']} rows, {summary['errors']} errors"
        + (f", {summary['skipped_already_done']} already done" if summary["skipped_already_done"] else "")
        + f") in {summary['wall_s']:.2f}s = {summary['images_per_s'] or 0:.1f} img/s; "
        f"stage busy: {stages}; waiting on queues: {waits}; out: {summary['out']}"
    )


__all__ = ["extract", "Extractor", "ExtractError", "PreprocessError", "format_summary"]
