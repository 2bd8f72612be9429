"""The ``fastfeat`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .models import DEFAULT_LAYERS, MODELS


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="extract CNN features of a folder or list of images into Parquet shards",
        description="Extract DeCAF-style CNN features into Parquet shards (see README).",
    )
    p.add_argument("source", help="a folder of images (recursive) or a list file with one path [label] per line")
    p.add_argument("--out", required=True, help="output directory for part-*.parquet, manifest.json, errors.parquet")
    p.add_argument("--model", default="caffenet", help=f"one of {', '.join(MODELS)} (default caffenet)")
    p.add_argument(
        "--weights", required=True, help="a .pth, .safetensors or .caffemodel file, or random:SEED (tests/benchmarks)"
    )
    p.add_argument(
        "--layers", default=",".join(DEFAULT_LAYERS), help="comma-separated layer names (default relu6,relu7)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default=None, help="default: bf16 where supported, else fp32"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--backend", default="torch", help="torch or triton (default torch)")
    p.add_argument("--shard-size", type=int, default=10_000, help="rows per Parquet shard at most (default 10000)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored feature type")
    p.add_argument("--mean-file", default=None, help=".npy mean image or per-channel mean (caffe style)")
    p.add_argument("--max-pixels", type=int, default=100_000_000, help="refuse images above this many pixels")
    p.add_argument("--threads", type=int, default=None, help="DALI CPU threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a different run found in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _run_extract(args) -> int:
    from .pipeline import Extractor, format_summary

    extractor = Extractor(
        args.source,
        args.out,
        model=args.model,
        weights=args.weights,
        layers=args.layers,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        backend=args.backend,
        shard_size=args.shard_size,
        dtype=args.dtype,
        mean_file=args.mean_file,
        max_pixels=args.max_pixels,
        num_threads=args.threads,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    summary = extractor.run()
    print(format_summary(summary), file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastfeat", description="Fast bulk CNN feature extraction (DeCAF).")
    parser.add_argument("--version", action="version", version=f"fastfeat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_extract(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "extract":
            return _run_extract(args)
    except KeyboardInterrupt:
        print("fastfeat: interrupted; finished shards are kept, run the same command again to resume", file=sys.stderr)
        return 130
    except ValueError as exc:  # every user-facing error class derives from ValueError
        print(f"fastfeat: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fastfeat: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
