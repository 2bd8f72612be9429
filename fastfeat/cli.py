"""The ``fastfeat`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .backends import backend_names
from .errors import FastfeatError
from .faults import DEFAULT_READ_RETRIES
from .models import DEFAULT_LAYERS, MODELS
from .published import PUBLISHED
from .sinks import DEFAULT_FORMAT, format_names
from .version import __version__

# The shapes as fastfeat.means.MEAN_SHAPES says (not imported: it loads numpy).
MEAN_FILE_HELP = (
    "Caffe-style .npy mean in 0-255 pixel units, subtracted (no std): shape (3,), (3,S,S) or (S,S,3), "
    "S >= the crop; Caffe-style models only (caffenet), not alexnet/vgg16 (ImageNet mean/std)"
)

# Every --weights takes the same three kinds of value (fastfeat.weights.load_weights): one help text.
WEIGHTS_HELP = (
    "a .pth, .safetensors or .caffemodel file; a published name, downloaded once, checked and cached "
    f"({', '.join(PUBLISHED)}: see `fastfeat weights list`; torchvision's ResNet50_Weights.IMAGENET1K_V2; "
    "timm's timm:ARCH.TAG from the Hugging Face hub); or random:SEED (meaningless features, "
    "for trying the pipeline, tests and benchmarks)"
)


def _add_forward_mode_options(p) -> None:
    """--cuda-graphs and --compile-mode: how the forward pass runs (extract, profile and serve alike)."""
    p.add_argument(
        "--cuda-graphs",
        default="auto",
        help="auto (default: on for the torch and triton backends on CUDA), on or off: replay the whole forward pass "
        "as one CUDA graph per batch-size bucket (docs/gpu.md)",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        help="--backend compile: default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs (the default "
        "on CUDA; on CPU the default is freezing)",
    )


def _compact(names: list[str]) -> str:
    """conv1 conv2 conv3 -> conv1-3; pool1 pool2 pool5 -> pool1,2,5; conv1_1 ... conv5_3 -> conv1_1..conv5_3."""
    import re

    groups: dict[tuple[str, bool], list[str]] = {}
    for name in names:
        prefix = re.sub(r"[\d_]+$", "", name)
        groups.setdefault((prefix, "_" in name[len(prefix) :]), []).append(name)
    parts = []
    for (prefix, nested), group in groups.items():
        nums = [n[len(prefix) :] for n in group]
        if len(group) == 1:
            parts.append(group[0])
        elif nested or not all(x.isdigit() for x in nums):
            parts.append(f"{group[0]}..{group[-1]}")
        elif len(group) > 2 and [int(x) for x in nums] == list(range(int(nums[0]), int(nums[0]) + len(nums))):
            parts.append(f"{prefix}{nums[0]}-{nums[-1]}")
        else:
            parts.append(prefix + ",".join(nums))
    return " ".join(parts)


MODEL_HELP = f"one of {', '.join(MODELS)} (default caffenet), or torchvision:NAME / timm:NAME (docs/models.md)"


def _layer_names_help() -> str:
    """Every registered model's layer names, compactly (for --layers)."""
    return "; ".join(f"{name}: {_compact(spec.layer_names)}" for name, spec in MODELS.items())


def _add_decoder_option(p) -> None:
    """--decoder, as extract and serve take it (one declaration: same choices, same default)."""
    p.add_argument(
        "--decoder",
        default=None,
        help="dali (NVIDIA DALI; the default where it is installed) or torchvision (torchvision.io.decode_jpeg, "
        "nvJPEG on CUDA, with the resize and crop in torch; the default without DALI); same geometry, pixels "
        "within one grey level (docs/decoders.md)",
    )


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="extract CNN features of a folder, list, tar shards or Parquet files of images into shards",
        description="Extract DeCAF-style CNN features into Parquet (or .npy) shards (see README).",
    )
    p.add_argument(
        "source",
        nargs="?",
        help="a folder of images (recursive), a list file (.txt/.lst/.csv/.tsv: path [label] per line), "
        "WebDataset .tar shards (brace patterns allowed), or .parquet files with an image column; "
        "or none, with --sample",
    )
    p.add_argument(
        "--sample",
        action="store_true",
        help="extract the few freely licensed photos shipped with fastfeat (fastfeat.samples) instead of SRC",
    )
    p.add_argument("--out", required=True, help="output directory for the shards, manifest.json, errors.parquet")
    p.add_argument("--model", default="caffenet", help=MODEL_HELP)
    p.add_argument(
        "--weights",
        required=True,
        help=WEIGHTS_HELP,
    )
    p.add_argument(
        "--layers",
        default=None,
        help=f"comma-separated layer names (default {','.join(DEFAULT_LAYERS)}; for torchvision:/timm: models its "
        "pooled feature, see `fastfeat models show NAME`); DeCAF6 = relu6, DeCAF7 = relu7 "
        f"(aliases decaf6, decaf7). Layers: {_layer_names_help()}",
    )
    p.add_argument(
        "--pool",
        default=None,
        help="torchvision:/timm: models only: avg (default), max, cls (a ViT's class token) or none (the whole map, "
        "flattened) for each tapped layer (docs/models.md)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default %(default)s)")
    p.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default=None, help="default: bf16 where supported, else fp32"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--backend", default="torch", help=f"one of {', '.join(backend_names())} (default torch)")
    _add_forward_mode_options(p)
    p.add_argument(
        "--format",
        default=DEFAULT_FORMAT,
        help=f"output format: {', '.join(format_names())} (default {DEFAULT_FORMAT})",
    )
    p.add_argument("--shard-size", type=int, default=10_000, help="input items per shard at most (default 10000)")
    p.add_argument(
        "--dtype", choices=("float16", "float32"), default="float16", help="stored feature type (default %(default)s)"
    )
    p.add_argument("--mean-file", default=None, help=MEAN_FILE_HELP)
    p.add_argument(
        "--max-pixels", type=int, default=100_000_000, help="refuse images above this many pixels (default %(default)s)"
    )
    p.add_argument("--threads", type=int, default=None, help="DALI CPU threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a different run found in --out")
    p.add_argument(
        "--append",
        action="store_true",
        help="on an existing output, extract only the items whose ids it does not hold, into new shards",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="skip images the decoder warns about (recoverable corruption) instead of keeping them with a record",
    )
    p.add_argument(
        "--max-error-rate",
        type=float,
        default=None,
        metavar="FRACTION",
        help="exit with code 1 when more than this fraction of the images fail (a run with no row always does)",
    )
    p.add_argument(
        "--augment",
        default="center",
        help="test-time views per image, reduced to one row: center (default), flip, center+flip, 5crop "
        "(centre + 4 corners) or 10crop (5crop and their mirrors); cropped from one decode and resize",
    )
    p.add_argument(
        "--augment-reduce", default="mean", help="how the views' features are combined: mean (default) or max"
    )
    p.add_argument(
        "--decode",
        default="fast",
        help="fast (default: resize only the crop window; features within 1e-4 of exact), exact (resize the "
        "whole image, then crop), or dct (fast, and large JPEGs decoded at 1/2-1/8 scale on the CPU: about 2x "
        "less CPU per big photo, features change by 3-7%%)",
    )
    _add_decoder_option(p)
    p.add_argument(
        "--read-retries",
        type=int,
        default=DEFAULT_READ_RETRIES,
        metavar="N",
        help="retry a read that fails transiently (HTTP 5xx/429, timeout, connection reset, EIO, ESTALE) up to N "
        "times with exponential backoff (default %(default)s: about 1-1.5 minutes); a read still failing, or failing "
        "for a reason that is not the image's (permission denied), stops the run without committing its shard",
    )
    p.add_argument(
        "--image-column",
        default="image",
        help="image column of Parquet sources (binary or {bytes,path}; default image)",
    )
    p.add_argument(
        "--num-shards", type=int, default=1, help="split the input into K parts (one per process; default 1)"
    )
    p.add_argument("--shard-index", type=int, default=0, help="the part this process extracts, 0..K-1 (default 0)")
    p.add_argument(
        "--devices",
        default=None,
        help="launch one worker per GPU: 0,1,... or auto (all parts share --out; default: none, this process)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the shards on a Ray cluster (ADDRESS as ray.init takes it, e.g. auto or ray://host:10001; none: "
        "a local Ray instance); same output as a single-process run, exactly once (see README)",
    )
    p.add_argument("--ray-workers", type=int, default=None, help="Ray workers (default: as many as the cluster fits)")
    p.add_argument(
        "--ray-cpus-per-worker",
        type=float,
        default=None,
        help="CPUs Ray reserves per worker, its thread count (default: 4 for CPU workers, the node's CPUs per GPU up "
        "to 8 for GPU workers)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _check_ray_args(args) -> None:
    """--ray and its options, before anything is imported or written."""
    from .cluster import check_ray_options
    from .errors import ConfigError

    if args.ray is None:
        if args.ray_workers is not None or args.ray_cpus_per_worker is not None:
            raise ConfigError("--ray-workers and --ray-cpus-per-worker need --ray")
        return
    if args.devices:
        raise ConfigError("--ray and --devices both spread the work: give one of them")
    if args.num_shards != 1 or args.shard_index != 0:
        raise ConfigError("--ray runs every shard of the output: drop --num-shards/--shard-index")
    check_ray_options(args.ray_workers, args.ray_cpus_per_worker)


def _run_extract(args, argv: list[str]) -> int:
    from .arguments import check_arguments

    options = dict(
        model=args.model, weights=args.weights, layers=args.layers, batch_size=args.batch_size,
        precision=args.precision, device=args.device, backend=args.backend, shard_size=args.shard_size,
        dtype=args.dtype, max_pixels=args.max_pixels, num_threads=args.threads, num_shards=args.num_shards,
        shard_index=args.shard_index, format=args.format, max_error_rate=args.max_error_rate,
        augment=args.augment, augment_reduce=args.augment_reduce, decode=args.decode, cuda_graphs=args.cuda_graphs,
        compile_mode=args.compile_mode, pool=args.pool, decoder=args.decoder,
    )  # fmt: skip
    source = _extract_source(args.source, args.sample)
    if args.read_retries < 0:
        from .errors import ConfigError

        raise ConfigError(f"--read-retries must be at least 0, got {args.read_retries}")
    # Before torch and DALI are imported: a bad flag is reported at once.
    check_arguments(**options, mean_file=args.mean_file)
    _check_ray_args(args)
    if args.devices:
        from .launch import launch_per_device
        from .storage import check_single_writer

        check_single_writer(args.out, 2, "--devices")  # one part per GPU, each writing the manifest

        return launch_per_device(args.devices, argv)
    from .errors import ExtractFailed, ReadStopped
    from .extractor import Extractor, format_summary

    extractor = Extractor(
        source, args.out, **options, mean_file=args.mean_file, overwrite=args.overwrite,
        progress=not args.no_progress, image_column=args.image_column, append=args.append, strict=args.strict,
        read_retries=args.read_retries,
    )  # fmt: skip
    try:
        if args.ray is not None:
            from .cluster import RayRunError, run_on_ray

            try:
                summary = run_on_ray(extractor, args.ray, args.ray_workers, args.ray_cpus_per_worker)
            except RayRunError as exc:
                print(f"fastfeat: error: {exc}", file=sys.stderr)
                return 1
        else:
            summary = extractor.run()
    except ReadStopped as stopped:  # a storage fault, not bad input: exit 1, the same command resumes
        print(f"fastfeat: error: {stopped}", file=sys.stderr)
        return 1
    except ExtractFailed as failed:
        print(format_summary(failed.summary), file=sys.stderr)
        if args.json:
            print(json.dumps(failed.summary, indent=1))
        print(f"fastfeat: error: {failed}", file=sys.stderr)
        return 1
    if summary.get("up_to_date"):
        print(f"{args.out} is already complete ({summary['rows']} rows); nothing to do", file=sys.stderr)
    else:
        print(format_summary(summary), file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=1))
    return 0


def _extract_source(source: str | None, sample: bool) -> str:
    """SRC, or the shipped sample photos with --sample: exactly one of the two."""
    from .errors import ConfigError

    if sample and source is not None:
        raise ConfigError(f"give SRC or --sample, not both (got SRC {source!r} and --sample)")
    if sample:
        from . import samples

        return samples.path()
    if source is None:
        raise ConfigError(
            "SRC is required: a folder, list file, .tar or .parquet of images; or --sample for the photos "
            "shipped with fastfeat"
        )
    return source


def _add_weights(sub) -> None:
    p = sub.add_parser(
        "weights",
        help="published weights by name: list them (cached or not), download them ahead of a run",
        description="Weights that --weights takes by name: each is downloaded once from its publisher (or "
        "$FASTFEAT_WEIGHTS_MIRROR; timm's hub weights: $HF_ENDPOINT), checked against the published checksum "
        "and cached in $FASTFEAT_CACHE (default $XDG_CACHE_HOME/fastfeat or ~/.cache/fastfeat).",
    )
    wsub = p.add_subparsers(dest="weights_command", required=True, parser_class=_Parser)
    lp = wsub.add_parser("list", help="names, model, size, checksum, source URL, and whether each is cached (where)")
    lp.add_argument("--json", action="store_true", help="print the list as JSON")
    dp = wsub.add_parser("download", help="download and check published weights now (e.g. before going offline)")
    dp.add_argument(
        "names",
        nargs="+",
        help=f"one or more of {', '.join(PUBLISHED)}, torchvision weights names (ResNet50_Weights.IMAGENET1K_V2) "
        "or timm's hub weights (timm:ARCH.TAG, e.g. timm:vit_small_patch16_224.augreg_in21k_ft_in1k)",
    )


def _run_weights(args) -> int:
    from .errors import ConfigError
    from .published import describe, fetch_pinned, format_list, lookup

    if args.weights_command == "list":
        rows = [describe(entry) for entry in PUBLISHED.values()]
        print(json.dumps(rows, indent=1) if args.json else format_list(rows))
        return 0
    entries = [lookup(name) for name in args.names]
    if None in entries:
        unknown = args.names[entries.index(None)]
        raise ConfigError(
            f"unknown published weights {unknown!r}; choose from {', '.join(PUBLISHED)}, a torchvision weights "
            "name or timm:ARCH.TAG"
        )
    for entry in entries:
        path, sha256, entry = fetch_pinned(entry)
        commit = f", {entry.hub[0]} commit {entry.commit}" if entry.hub is not None else ""
        print(f"{entry.name}: {path} (sha256 {sha256}{commit})")
    return 0


def _add_profile(sub) -> None:
    # Every option is a plain string checked by fastfeat.profile, so a bad value is one
    # "fastfeat: error:" line (exit 2) rather than argparse's usage dump.
    p = sub.add_parser(
        "profile",
        help="time every layer of the forward pass (DeCAF Figure 3)",
        description="Time each op of the forward pass on random images; print a per-layer table.",
    )
    p.add_argument("--model", default="caffenet", help=MODEL_HELP)
    p.add_argument(
        "--backend", default="torch", help=f"{', '.join(backend_names())} or all, comma-separated (default torch)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    _add_forward_mode_options(p)
    p.add_argument("--precision", default=None, help="fp32, bf16 or fp16 (default: bf16 where supported, else fp32)")
    p.add_argument("--batch-size", default="1,64", help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--repeat", default="10", help="timed runs per op; the table shows their median (default 10)")
    p.add_argument("--warmup", default="2", help="untimed runs per op (default 2; at least 1 where ops compile)")
    p.add_argument("--weights", default="random:0", help=WEIGHTS_HELP + " (default random:0)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as a JSON list")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw the per-layer shares (needs matplotlib)")


def _run_profile(args) -> int:
    from .profile import check_outputs, format_table, plot_profile, profile, write_json

    check_outputs(args.json, args.plot)  # fail before minutes of profiling, not after
    from .zoo import is_zoo_name

    if args.plot and is_zoo_name(args.model):
        from .errors import ConfigError

        raise ConfigError("--plot draws fastfeat's own networks' layers only; use --json for a library model")
    results = profile(
        model=args.model,
        backends=args.backend,
        device=args.device,
        precision=args.precision,
        batch_sizes=args.batch_size,
        repeat=args.repeat,
        warmup=args.warmup,
        weights=args.weights,
        log=lambda line: print(line, file=sys.stderr),
        cuda_graphs=args.cuda_graphs,
        compile_mode=args.compile_mode,
    )
    if results and "modules" in results[0]:  # a torchvision/timm model: per module (fastfeat.profile_modules)
        from .profile_modules import format_module_table

        print(format_module_table(results))
    else:
        print(format_table(results))
    if args.json:
        write_json(results, args.json)
    if args.plot:
        plot_profile(results, args.plot)
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve features over HTTP: dynamic batching, nearest neighbours, a page to try it",
        description="Answer POST /v1/features (and /v1/neighbors with --index) with the features extract "
        "computes, coalescing concurrent requests into batches; a page at / (see README, Serving features).",
    )
    p.add_argument("--model", default="caffenet", help=MODEL_HELP)
    p.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    p.add_argument("--layers", default="relu7", help="comma-separated layers computed for every image (default relu7)")
    p.add_argument(
        "--pool", default=None, help="torchvision:/timm: models: avg (default), max, cls or none (docs/models.md)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default=None, help="default: bf16 where supported, else fp32"
    )
    p.add_argument("--backend", default="torch", help=f"one of {', '.join(backend_names())} (default torch)")
    _add_forward_mode_options(p)
    p.add_argument(
        "--dtype", choices=("float16", "float32"), default="float32", help="response dtype (default float32)"
    )
    p.add_argument("--max-batch", type=int, default=64, help="images per forward pass at most (default 64)")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="longest wait for a batch to fill (default 5)")
    p.add_argument("--max-queue", type=int, default=None, help="images admitted at once before 429 (default 4 × max-batch)")  # fmt: skip
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body, MiB (default 32; 413 above)")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (422; default 100 M)")
    p.add_argument("--mean-file", default=None, help=MEAN_FILE_HELP)
    p.add_argument("--threads", type=int, default=None, help="DALI CPU threads (default: all cores)")
    p.add_argument(
        "--index", default=None, metavar="DIR", help="an output directory of fastfeat extract to search (default: none)"
    )
    p.add_argument("--index-layer", default=None, help="the layer searched (default: the deepest served one it holds)")
    p.add_argument(
        "--exact-below", type=int, default=None, help="exact search below this many rows, HNSW above (default 10000)"
    )
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (visible in ps: prefer --token-file)")  # fmt: skip
    p.add_argument("--token-file", default=None, help="read the bearer token from this file (default: no token)")
    _add_decoder_option(p)
    p.add_argument("--access-log", action="store_true", help="log every request on stderr")
    p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="answer 503 to a request still unanswered after S seconds (default 60)")  # fmt: skip


def _run_serve(args) -> int:
    from .errors import ConfigError
    from .serve import ServeConfig, serve
    from .serve.config import DEFAULT_EXACT_BELOW, DEFAULT_REQUEST_TIMEOUT_S

    token = args.token
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {args.token_file}: {exc.strerror or exc}") from None
    cfg = ServeConfig(
        model=args.model, weights=args.weights, layers=args.layers, host=args.host, port=args.port,
        device=args.device, precision=args.precision, backend=args.backend, cuda_graphs=args.cuda_graphs,
        compile_mode=args.compile_mode, dtype=args.dtype, pool=args.pool, decoder=args.decoder,
        max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, max_queue=args.max_queue,
        max_body_mb=args.max_body_mb, max_pixels=args.max_pixels, mean_file=args.mean_file, threads=args.threads,
        index=args.index, index_layer=args.index_layer,
        exact_below=DEFAULT_EXACT_BELOW if args.exact_below is None else args.exact_below, token=token,
        access_log=args.access_log,
        request_timeout_s=DEFAULT_REQUEST_TIMEOUT_S if args.request_timeout is None else args.request_timeout,
    )  # fmt: skip
    serve(cfg)
    return 0


def _add_probe(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="DeCAF's linear-probe evaluation: train/test splits per class, mean per-class accuracy",
        description="Fit a linear classifier on the features of an output directory with DeCAF's protocol "
        "(TRAIN per class for training, the rest for testing, SPLITS random splits, C chosen on held-out "
        "training rows) and report mean per-class accuracy ± std over the splits (see README).",
    )
    p.add_argument("dir", help="an output directory of fastfeat extract (labelled: a folder of class folders)")
    p.add_argument(
        "--layer",
        default="relu7",
        help="the feature layer (default relu7: DeCAF7), or several, comma-separated and shallow first "
        "(pool5,fc6,relu6,fc7,relu7): one probe per layer, one table and JSON row per layer",
    )
    p.add_argument("--train-per-class", type=int, default=30, help="training rows per class (default 30)")
    p.add_argument("--test-per-class", type=int, default=None, help="test rows per class (default: all the others)")
    p.add_argument("--splits", type=int, default=5, help="random splits (default 5)")
    p.add_argument("--classifier", default="logreg", help="logreg (multinomial; default) or svm (one-vs-rest linear)")
    p.add_argument(
        "--C",
        dest="c",
        default="auto",
        help="regularisation on standardised rows: auto (default: chosen on held-out rows) or a value",
    )
    p.add_argument("--l2-normalize", action="store_true", help="scale each feature vector to unit length first")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits (default 0)")
    p.add_argument(
        "--engine",
        default="auto",
        help="sklearn (in memory), torch (streamed, GPU if any) or auto (default: sklearn when the rows fit in 2 GiB)",
    )
    p.add_argument("--device", default="auto", help="torch engine: auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.add_argument(
        "--chart",
        default=None,
        metavar="FILE",
        help="also draw accuracy against layer (the --layer order) with ± std error bars: .png, .pdf or .svg",
    )


def _run_probe(args) -> int:
    import os

    from .probe import ProbeError, format_report, run_probe, write_json

    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ProbeError(f"folder of --json does not exist: {os.path.dirname(os.path.abspath(args.json))}")
    if "," in args.layer or args.chart:
        return _run_probe_depth(args)
    report = run_probe(
        args.dir, args.layer, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
        splits=args.splits, classifier=args.classifier, c=args.c, l2_normalize=args.l2_normalize, seed=args.seed,
        engine=args.engine, device=args.device, log=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
    return 0


def _run_probe_depth(args) -> int:
    from .probe_depth import check_chart, draw_chart, format_depth, parse_layers, run_depth, write_json

    layers = parse_layers(args.layer)
    check_chart(args.chart)
    report = run_depth(
        args.dir, layers, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
        splits=args.splits, classifier=args.classifier, c=args.c, l2_normalize=args.l2_normalize, seed=args.seed,
        engine=args.engine, device=args.device, log=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    print(format_depth(report))
    if args.json:
        write_json(report, args.json)
    if args.chart:
        draw_chart(report, args.chart)
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="a 2-D embedding (t-SNE or PCA) of a sample of the features, coloured by label",
        description="Draw a t-SNE (or PCA) embedding of up to --max-points rows of an output directory, one "
        "colour per label with a legend, as DeCAF's Figure 1.",
    )
    p.add_argument("dir", help="an output directory of fastfeat extract")
    p.add_argument("--layer", default="relu7", help="the feature layer (default relu7)")
    p.add_argument("--out", required=True, help="the image to write: .png, .pdf or .svg")
    p.add_argument("--method", default="tsne", help="tsne (default) or pca")
    p.add_argument("--max-points", type=int, default=2000, help="rows sampled at most (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and of t-SNE (default 0)")


def _run_plot(args) -> int:
    from .plot import plot_embedding

    drawn = plot_embedding(
        args.dir, args.layer, args.out, method=args.method, max_points=args.max_points, seed=args.seed
    )
    print(f"{args.out}: {drawn['method']} of {drawn['points']} of {drawn['rows']} rows, {drawn['classes']} labels")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="benchmark scores of an output: image-retrieval mAP (Holidays, Oxford, Paris, revisited, UKBench), "
        "VOC 2007 classification mAP",
        description="Evaluate the features of an output directory on a published benchmark (see docs/evaluation.md).",
    )
    esub = p.add_subparsers(dest="eval_command", required=True, parser_class=_Parser)
    r = esub.add_parser(
        "retrieval",
        help="rank the database by cosine similarity to each query and print mAP (N-S score for UKBench)",
        description="Rank the database rows of DIR by cosine similarity to each query (exact, faiss IndexFlatIP) "
        "and score the rankings with the benchmark's ground truth: mAP with junk ignored (holidays, oxford5k, "
        "paris6k), Easy/Medium/Hard mAP and mP@1,5,10 (roxford5k, rparis6k: revisitop's compute_map), N-S "
        "score (ukbench). Images are matched by file name.",
    )
    r.add_argument("dir", help="an output directory of fastfeat extract holding the dataset's images")
    r.add_argument("--dataset", required=True, help="holidays, oxford5k, paris6k, roxford5k, rparis6k or ukbench")
    r.add_argument("--gt", default=None, help="ground truth: the gt_files folder (oxford5k, paris6k), gnd_*.pkl or "
                   "its JSON form (roxford5k, rparis6k); holidays and ukbench take it from the file names")  # fmt: skip
    r.add_argument("--layer", default=None, help="the feature layer (default: the output's only layer)")
    r.add_argument("--queries", default=None, metavar="QDIR", help="an extract of the cropped queries (see "
                   "`fastfeat eval crop-queries`); default: the full query images' rows in DIR")  # fmt: skip
    r.add_argument("--l2", action="store_true", help="scale each row to unit length first (Razavian et al.)")
    r.add_argument(
        "--pca", type=int, default=None, metavar="N", help="project on N principal axes learned on --pca-from"
    )
    r.add_argument("--pca-from", default=None, metavar="DIR2", help="the output the PCA/whitening is learned on")
    r.add_argument(
        "--whiten", action="store_true", help="divide each principal component by its std (needs --pca-from)"
    )
    r.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    c = esub.add_parser(
        "crop-queries",
        help="write the query crops of Oxford/Paris (or revisited) ground truth as PNG files, for --queries",
        description="Crop each query image to its ground-truth box and write OUT/<query>.png (lossless); extract "
        "OUT with the database's options and pass it to `eval retrieval --queries`.",
    )
    c.add_argument("--dataset", required=True, help="oxford5k, paris6k, roxford5k or rparis6k")
    c.add_argument("--gt", required=True, help="the ground truth, as for eval retrieval")
    c.add_argument("--images", required=True, help="the folder of the dataset's images (<name>.jpg)")
    c.add_argument("--out", required=True, help="the folder to write the crops into")
    v = esub.add_parser(
        "voc",
        help="PASCAL VOC 2007 classification: one-vs-rest linear SVMs, per-class 11-point AP and mAP",
        description="Chatfield et al. (2014)'s VOC 2007 protocol on an extract of JPEGImages/: for each class a "
        "linear SVM on the L2-normalised trainval rows (difficult images left out; C chosen on the devkit's "
        "train -> val split with --C auto), scored on test by the VOC2007 devkit's 11-point AP with difficult "
        "images ignored; prints per-class AP and mAP. Images are matched by file stem (see docs/evaluation.md).",
    )
    v.add_argument("dir", help="an output directory of fastfeat extract holding VOC2007's JPEGImages")
    v.add_argument("--devkit", required=True, help="the VOCdevkit/VOC2007 folder (ImageSets/Main is read)")
    v.add_argument("--layer", default=None, help="the feature layer (default: the output's only layer)")
    v.add_argument("--classes", default=None, help="a comma-separated subset of the 20 VOC classes (default: all 20)")
    v.add_argument(
        "--C",
        dest="c",
        default="auto",
        help="SVM regularisation on standardised rows: auto (default: chosen per class on train -> val) or a value",
    )
    v.add_argument(
        "--engine", default="auto", help="sklearn (in memory), torch (streamed, GPU if any) or auto (default)"
    )
    v.add_argument("--device", default="auto", help="torch engine: auto, cpu or cuda[:N] (default auto)")
    v.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")


def _run_eval(args) -> int:
    from .retrieval import RetrievalError, crop_queries, evaluate, format_report

    if args.eval_command == "crop-queries":
        written = crop_queries(args.dataset, args.gt, args.images, args.out)
        print(f"{args.out}: {len(written)} query crops written")
        return 0
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise RetrievalError(f"folder of --json does not exist: {os.path.dirname(os.path.abspath(args.json))}")
    if args.eval_command == "voc":
        return _run_eval_voc(args)
    report = evaluate(
        args.dir, args.dataset, gt=args.gt, layer=args.layer, queries=args.queries, l2=args.l2, pca=args.pca,
        pca_from=args.pca_from, whiten=args.whiten,
    )  # fmt: skip
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


def _run_eval_voc(args) -> int:
    from .voc import parse_classes
    from .voc_eval import evaluate, format_report

    report = evaluate(
        args.dir, args.devkit, layer=args.layer, classes=parse_classes(args.classes), c=args.c, engine=args.engine,
        device=args.device, log=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit code 2 (not the usage block)."""

    def error(self, message):
        self.exit(2, f"fastfeat: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastfeat", description="Fast bulk CNN feature extraction (DeCAF).")
    parser.add_argument("--version", action="version", version=f"fastfeat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_extract(sub)
    _add_profile(sub)
    _add_verify(sub)
    _add_probe(sub)
    _add_eval(sub)
    _add_plot(sub)
    _add_serve(sub)
    _add_weights(sub)
    _add_models(sub)
    return parser


def _add_models(sub) -> None:
    p = sub.add_parser(
        "models",
        help="the built-in networks, and every tap of a network (torchvision:NAME, timm:NAME too) with its shape",
        description="List the networks --model takes, or show one network's taps (--layers names) with each "
        "one's per-image shape and size in bytes per image (docs/models.md).",
    )
    msub = p.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    msub.add_parser("list", help="the built-in networks, and how to name any torchvision or timm model")
    sp = msub.add_parser("show", help="every tap of NAME with its output shape and bytes per image")
    sp.add_argument("name", help="a built-in network, torchvision:NAME or timm:NAME")
    sp.add_argument(
        "--pool", default=None, help="torchvision:/timm: models: the shapes under this --pool (default avg)"
    )
    sp.add_argument("--dtype", default="float16", help="bytes per image as stored in this dtype (default float16)")
    sp.add_argument("--json", action="store_true", help="print the taps as JSON")


def _run_models(args) -> int:
    from .errors import ConfigError
    from .model_listing import format_show, list_lines, show_rows

    if args.models_command == "list":
        print("\n".join(list_lines()))
        return 0
    if args.dtype not in ("float16", "float32"):
        raise ConfigError(f"unknown --dtype {args.dtype!r}; choose float16 or float32")
    try:
        rows = show_rows(args.name, args.pool, args.dtype)
    except (KeyError, ValueError) as exc:
        raise ConfigError(str(exc).strip("'\"")) from None
    print(json.dumps(rows, indent=1) if args.json else format_show(args.name, rows, args.pool, args.dtype))
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check every shard of an output directory against its manifest",
        description="Check an output directory of fastfeat extract against its manifest.json: every listed "
        "shard file is present with its recorded SHA-256 checksum and row count, ids are unique across "
        "shards, rows plus errors account for every input item of each shard, and a run marked complete "
        "lists all its shards. Each problem is printed on stderr. Exit code 0 when everything matches, "
        "1 when a problem was found, 2 when the manifest cannot be read.",
    )
    p.add_argument("out", help="an output directory of fastfeat extract")
    p.add_argument("--partial", action="store_true", help="accept an unfinished run: check only the finished shards")


def _run_verify(args) -> int:
    from .output.verification import verify

    problems = verify(args.out, partial=args.partial)
    for problem in problems:
        print(f"fastfeat verify: {problem}", file=sys.stderr)
    print(f"{args.out}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    from . import summary

    summary.mark_command_start()  # wall times count from the process's start (fastfeat.summary)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:  # a bare `fastfeat`: the whole usage, not just "the following arguments are required"
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        code = _dispatch(args, argv)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`fastfeat ... --json | head`): stop quietly, as Unix tools do. Python
        # would report the pipe again while flushing stdout at exit: point stdout at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a Unix tool stopped by it
    except KeyboardInterrupt:
        print("fastfeat: interrupted; finished shards are kept, run the same command again to resume", file=sys.stderr)
        return 130
    except FastfeatError as exc:  # what the user can fix: one line, no traceback
        print(f"fastfeat: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's (disk full, permission denied): one line, the run can be redone
        print(f"fastfeat: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except Exception:  # anything else is a bug in fastfeat, even a ValueError (pyarrow's, numpy's)
        report_bug(argv)
        return 1
    return 2


def _dispatch(args, argv: list[str]) -> int:
    if args.command == "extract":  # the only one that needs its command line (--devices relaunches it)
        return _run_extract(args, argv)
    run = {
        "verify": _run_verify, "profile": _run_profile, "probe": _run_probe, "eval": _run_eval,
        "plot": _run_plot, "serve": _run_serve, "weights": _run_weights, "models": _run_models,
    }.get(args.command)  # fmt: skip
    return 2 if run is None else run(args)


def report_bug(argv: list[str]) -> None:
    """The traceback of the exception being handled, and a line saying that it is fastfeat's bug."""
    import platform
    import shlex
    import traceback

    traceback.print_exc()
    print(
        f"fastfeat: internal error: this is a bug in fastfeat {__version__}, not a problem with your input or flags; "
        "please report it to the fastfeat developers with the traceback above, the command line "
        f"(fastfeat {shlex.join(argv)}) and the versions (Python {platform.python_version()}, {platform.platform()})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
