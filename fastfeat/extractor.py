"""``fastfeat.extract``: validate the arguments, then wire sources -> decode -> runner -> backend -> sink.

Everything is checked before anything is written: a bad argument raises a ConfigError (one line,
exit code 2) and leaves no output directory behind.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import redirect_stderr

from . import storage
from .arguments import check_arguments
from .augment import DEFAULT_AUGMENT, get_views
from .backends import unavailable_reason
from .checksum import file_sha256
from .console import console
from .errors import ConfigError, ExtractFailed
from .faults import DEFAULT_READ_RETRIES
from .graphs import resolve_cuda_graphs
from .header import DEFAULT_MAX_PIXELS
from .models import DEFAULT_DECODE, default_decoder
from .output import SUMMARY, OutputDir, ShardTransaction, plan_items, shard_tasks
from .published import WEIGHTS_CHOICES
from .published import resolve as resolve_published
from .runner import Runner, RunStats, ShardTask
from .runtime import git_sha, resolve_device, resolve_precision
from .sinks import DEFAULT_FORMAT, get_sink
from .sinks.base import Layout
from .sources import ItemReader, format_skipped, list_items
from .stages import StageOptions, build_stages, mean_for, raise_pillow_limit
from .summary import ProgressBar, format_summary, run_summary
from .weights import WeightsError, load_weights

ExtractError = ConfigError  # the name the Python API has always raised


class Extractor:
    """Validated configuration of one extraction run; ``run()`` does the work."""

    def __init__(
        self, source: str, out: str, model: str = "caffenet", weights: str | None = None,
        layers: str | list[str] | None = None, batch_size: int = 64, precision: str | None = None,
        device: str = "auto", backend: str = "torch", shard_size: int = 10_000, dtype: str = "float16",
        mean_file: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, num_threads: int | None = None,
        overwrite: bool = False, progress: bool = True, image_column: str = "image", num_shards: int = 1,
        shard_index: int = 0, format: str = DEFAULT_FORMAT, append: bool = False, strict: bool = False,
        max_error_rate: float | None = None, augment: str = DEFAULT_AUGMENT, augment_reduce: str = "mean",
        decode: str = DEFAULT_DECODE, cuda_graphs: str = "auto", compile_mode: str | None = None,
        read_retries: int = DEFAULT_READ_RETRIES, pool: str | None = None, decoder: str | None = None,
    ):  # fmt: skip
        self.started = time.perf_counter()
        decoder = decoder or default_decoder()  # resolved here: the run config records the decoder that ran
        self.spec, self.layers = check_arguments(
            model=model, layers=layers, weights=weights, batch_size=batch_size, shard_size=shard_size, dtype=dtype,
            precision=precision, device=device, backend=backend, format=format, max_pixels=max_pixels,
            num_threads=num_threads, num_shards=num_shards, shard_index=shard_index, max_error_rate=max_error_rate,
            augment=augment, augment_reduce=augment_reduce, decode=decode, mean_file=mean_file,
            cuda_graphs=cuda_graphs, compile_mode=compile_mode, pool=pool, decoder=decoder,
        )  # fmt: skip
        self.decode_mode = decode  # before run_metadata, which records it
        if not isinstance(read_retries, int) or read_retries < 0:
            raise ConfigError(f"--read-retries must be a whole number, at least 0, got {read_retries!r}")
        # Not in the run config: retries change no row, so a resume with another count is the same run.
        self.read_retries = read_retries
        storage.check_single_writer(out, num_shards)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.cuda_graphs = resolve_cuda_graphs(cuda_graphs, self.device, backend)
        self.compile_mode = compile_mode
        if (why := unavailable_reason(backend, self.device)) is not None:
            raise ConfigError(f"backend {backend!r} is not available: {why}")
        raise_pillow_limit(max_pixels)
        items = _list(source, image_column, progress)  # SourceError (a ValueError) for missing/empty sources
        self.weights_source, self.weights_id, self.weights = weights, *weights_identity(self.spec, weights)
        pre = self.spec.preprocess
        self.views, self.augment, self.augment_reduce = get_views(augment), augment, augment_reduce
        self.mean_image = mean_for(mean_file, pre, augment)
        self.out, self.backend_name, self.format = out, backend, format
        self.batch_size, self.shard_size, self.dtype = batch_size, shard_size, dtype
        self.max_pixels, self.num_threads, self.progress = max_pixels, num_threads, progress
        self.image_column, self.num_shards, self.shard_index = image_column, num_shards, shard_index
        self.strict, self.max_error_rate = strict, max_error_rate
        self.stage_options = StageOptions(
            self.spec, self.layers, self.device, self.precision, backend=backend, dtype=dtype, batch_size=batch_size,
            num_threads=num_threads, max_pixels=max_pixels, augment=augment, augment_reduce=augment_reduce,
            decode=decode, cuda_graphs=self.cuda_graphs, compile_mode=compile_mode, mean_file=mean_file,
            mean_image=self.mean_image, weights_id=self.weights_id, decoder=decoder,
        )  # fmt: skip
        self.metadata = self.stage_options.metadata()
        self.sink = get_sink(format)(Layout(self.stage_options.dims(), dtype, self.metadata))
        self.output = OutputDir(out, run_config(self), overwrite=overwrite)
        self.output.source = storage.display(source)  # a URI without its options (they may hold keys)
        self.items, self.new_generation = plan_items(self.output, items, append)
        if self.weights is None and not self.up_to_date():  # validate the file before anything is written
            self.weights = load_weights(self.spec, weights)

    def shards(self) -> list[ShardTask]:
        """This part's output shards (every ``num_shards``-th one) over every generation, finished or not."""
        generations = self.output.generations + ([self.new_generation[0]] if self.new_generation else [])
        return [
            ShardTask(*t)
            for t in shard_tasks(generations, self.shard_size)
            if t[0] % self.num_shards == self.shard_index
        ]

    def reader(self) -> ItemReader:
        """The read stage's reader: transient failures retried ``read_retries`` times (fastfeat.faults)."""
        return ItemReader(self.image_column, retries=self.read_retries)

    def up_to_date(self) -> bool:
        return self.new_generation is None and all(s.index in self.output.shards for s in self.shards())

    def run(self) -> dict:
        if self.up_to_date():  # nothing to load or build; the last real run's summary is kept
            summary = _read_json(storage.join(self.output.path, SUMMARY))
            return {**summary, "up_to_date": True, "rows": self.output.rows()}
        stages = build_stages(self.stage_options, self.weights.tensors, self.reader())
        try:
            return self._run_stages(stages)
        finally:
            stages.close()  # the decoder's threads and the reader's files, also when the run fails

    def _run_stages(self, stages) -> dict:
        todo, done_items, total = self.begin()
        # Python's stderr (and the bar) bypass fd 2, where the decoder's native warnings are captured.
        with redirect_stderr(console()):
            bar = ProgressBar(total) if self.progress and total else None
            runner = Runner(
                self.items, self.batch_size,
                read=stages.read, decode=stages.decoder.decode, forward=stages.forward,
                open_shard=lambda s: ShardTransaction(self.output, self.sink, s.index, s.first, s.end),
                progress=bar.update if bar is not None else None, strict=self.strict,
            )  # fmt: skip
            startup_s = time.perf_counter() - self.started
            try:
                stats = runner.run(todo)
            finally:
                if bar is not None:
                    bar.close()
        return self.end(stats, total, done_items, startup_s)

    def begin(self) -> tuple[list[ShardTask], int, int]:
        """Create OUT/ (recording a new generation): (the shards still to do, items already done, items to do).
        Shared with the Ray driver (fastfeat.cluster), which runs the shards on its workers."""
        self.output.create(self.new_generation)
        self.new_generation = None  # recorded now (by this process or a sibling part): output.generations has it
        todo = [s for s in self.shards() if s.index not in self.output.shards]
        done_items = sum(s.end - s.first for s in self.shards()) - sum(s.end - s.first for s in todo)
        return todo, done_items, sum(s.end - s.first for s in todo)

    def end(self, stats: RunStats, total: int, done_items: int, startup_s: float, **extra) -> dict:
        """Mark OUT/ complete (if it is), write errors.parquet and summary.json; raise ExtractFailed on too
        many errors.  ``extra`` goes into the summary (a Ray run's workers)."""
        complete = self.output.finish()
        summary = run_summary(self, stats, total, done_items, complete, git_sha(), startup_s=startup_s)
        summary.update(extra)
        self.output.write_summary(summary)
        _check_failure(summary, self.max_error_rate, self.out)
        return summary


def _list(source: str, image_column: str, progress: bool):
    """The items, with a running count on a terminal while a big source is listed, and one line
    naming what the listing skipped (looping folder links, broken links, unreadable folders)."""
    shown = []

    def count(n: int) -> None:
        shown.append(n)
        print(f"\rlisting: {n:,} images", end="", file=sys.stderr, flush=True)

    items = list_items(source, image_column, progress=count if progress and sys.stderr.isatty() else None)
    if shown:
        print(file=sys.stderr)
    if (line := format_skipped(items.skipped)) is not None:
        print(f"listing: {line}", file=sys.stderr)
    return items


def _check_failure(summary: dict, max_error_rate: float | None, out: str) -> None:
    """A run that wrote no row, or failed on more than ``max_error_rate`` of its images, is a failure."""
    processed, errors = summary["processed"], summary["errors"]
    where = os.path.join(out, "errors.parquet")
    if storage.is_remote(out):
        where = storage.display(storage.join(out, "errors.parquet"))
    if processed and summary["rows_written"] == 0:
        raise ExtractFailed(f"no image could be used: all {processed} failed; see {where}", summary)
    if max_error_rate is not None and processed and errors / processed > max_error_rate:
        raise ExtractFailed(
            f"{errors} of {processed} images failed ({errors / processed:.1%}), above --max-error-rate "
            f"{max_error_rate:g}; see {where}",
            summary,
        )


def _read_json(path: str) -> dict:
    try:
        if storage.is_remote(path):
            return json.loads(storage.read_bytes(path))
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def weights_identity(spec, source: str) -> tuple[dict, object]:
    """({"source", "sha256", "random"}, the loaded Weights or None): a file is hashed, not parsed, so a
    finished output is recognised without loading a model (parsing happens once there is work).
    A published name (``caffenet-imagenet``) is its checked cached file, downloaded first if needed;
    its identity is the name, the sha256 and the publisher's URL (not the cache path: it is machine-specific);
    timm's hub weights add the hub repo, file and pinned commit (the URL names the commit too)."""
    if source.startswith("random:"):
        w = load_weights(spec, source)
        return {"source": w.source, "sha256": w.sha256, "random": True}, w
    if (published := resolve_published(source, spec.name)) is not None:
        entry = published[2]
        identity = {"source": source, "sha256": published[1], "random": False, "url": entry.url}
        if entry.hub is not None:
            identity.update(repo=entry.hub[0], file=entry.hub[2], revision=entry.commit)
        return identity, None
    if not os.path.isfile(source):
        raise WeightsError(f"weights file not found: {source} ({WEIGHTS_CHOICES})")
    return {"source": os.path.abspath(source), "sha256": file_sha256(source), "random": False}, None


def run_config(ex: Extractor) -> dict:
    """Everything that changes a row, a shard boundary or a shard's metadata: a resumed run must
    match on all of it, or it could mix shards that differ from a clean run's.  Not the items
    (each generation records its own, see fastfeat.output.plan_items) nor where the source lives:
    a moved folder with the same ids resumes."""
    config = {
        "format": ex.format,
        "layers": ex.layers,
        "batch_size": ex.batch_size,
        "shard_size": ex.shard_size,
        "max_pixels": ex.max_pixels,
        "image_column": ex.image_column,
        "metadata": ex.metadata,
        "strict": ex.strict,
    }
    return config


def extract(source: str, out: str, **kwargs) -> dict:
    """Extract features of every image of ``source`` into shards in ``out``.

    Mirrors ``fastfeat extract``; keyword arguments are those of :class:`Extractor`.
    Returns the run summary (also written to ``out/summary.json``).
    """
    return Extractor(source, out, **kwargs).run()


__all__ = ["extract", "Extractor", "ExtractError", "format_summary"]
