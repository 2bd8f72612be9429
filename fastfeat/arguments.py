"""Checks of ``extract``'s arguments that need no torch, DALI or data: the CLI runs them before the
heavy imports, so a bad flag is reported at once (one line, exit code 2)."""

from __future__ import annotations

import re

from .augment import DEFAULT_AUGMENT, check_augment
from .backends import backend_names
from .errors import ConfigError
from .graphs import check_cuda_graphs
from .means import check_mean_file
from .model_lookup import resolve_model
from .models import DECODE_MODES, DECODERS, DEFAULT_DECODE, ModelSpec, default_decoder, parse_layers
from .published import WEIGHTS_CHOICES, check_model, download_url
from .published import lookup as lookup_published
from .sinks import format_names

PRECISION_NAMES = ("fp32", "bf16", "fp16")
OUTPUT_DTYPE_NAMES = ("float16", "float32")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# torch.compile's modes (--compile-mode; the compile backend's default is COMPILE_DEFAULT_MODE on CUDA).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str | None, backend: str) -> None:
    """ConfigError for an unknown --compile-mode, or one given to a backend that does not compile."""
    if mode is None:
        return
    if mode not in COMPILE_MODES:
        raise ConfigError(f"unknown --compile-mode {mode!r}; choose from {', '.join(COMPILE_MODES)}")
    if backend != "compile":
        raise ConfigError(f"--compile-mode applies to --backend compile, not {backend!r}")


def check_arguments(
    *,
    model: str,
    layers,
    weights: str | None,
    batch_size: int,
    shard_size: int,
    dtype: str,
    precision: str | None,
    device: str,
    backend: str,
    format: str,
    max_pixels: int,
    num_threads: int | None,
    num_shards: int,
    shard_index: int,
    max_error_rate: float | None,
    augment: str = DEFAULT_AUGMENT,
    augment_reduce: str = "mean",
    decode: str = DEFAULT_DECODE,
    mean_file: str | None = None,
    cuda_graphs: str = "auto",
    compile_mode: str | None = None,
    pool: str | None = None,
    decoder: str | None = None,
) -> tuple[ModelSpec, list[str]]:
    """The model spec and the requested layers in forward order; ConfigError for anything wrong."""
    try:
        spec = resolve_model(model, pool)
        names = parse_layers(spec, layers)
    except (ValueError, KeyError) as exc:
        raise ConfigError(str(exc).strip("'\"")) from None
    if getattr(spec, "is_zoo", False) and backend == "triton" and (why := _zoo_triton_refusal(spec)) is not None:
        raise ConfigError(why)
    check_mean_file(mean_file, spec.preprocess, spec.name)
    for flag, value in (("batch-size", batch_size), ("shard-size", shard_size), ("threads", num_threads),
                        ("max-pixels", max_pixels)):  # fmt: skip
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {value}")
    if dtype not in OUTPUT_DTYPE_NAMES:
        raise ConfigError(f"unknown --dtype {dtype!r}; choose float16 or float32")
    if precision is not None and precision not in PRECISION_NAMES:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISION_NAMES)}")
    if not _DEVICE.match(device):
        raise ConfigError(f"unknown device {device!r}; choose auto, cpu or cuda[:N]")
    if backend not in backend_names():
        raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(backend_names())}")
    check_cuda_graphs(cuda_graphs)
    check_compile_mode(compile_mode, backend)
    if format not in format_names():
        raise ConfigError(f"unknown output format {format!r}; choose from {', '.join(format_names())}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError(f"--shard-index must be in [0, --num-shards={num_shards}), got {shard_index}")
    if max_error_rate is not None and not 0 <= max_error_rate <= 1:
        raise ConfigError(f"--max-error-rate must be a fraction in [0, 1], got {max_error_rate}")
    check_augment(augment, augment_reduce)
    if decode not in DECODE_MODES:
        raise ConfigError(f"unknown --decode {decode!r}; choose from {', '.join(DECODE_MODES)}")
    check_decoder(decoder, decode)
    if weights is None:
        raise ConfigError(f"--weights is required: {WEIGHTS_CHOICES.removeprefix('--weights takes ')}")
    if (entry := lookup_published(weights)) is not None:  # before any download: the model, the mirror URL
        check_model(entry, spec.name)
        download_url(entry)
    return spec, names


def check_decoder(decoder: str | None, decode: str = DEFAULT_DECODE) -> None:
    """--decoder is one of DECODERS (None: the default, DALI where it is installed); the torchvision decoder
    has no DCT-scaled decoding (--decode dct)."""
    decoder = decoder or default_decoder()
    if decoder not in DECODERS:
        raise ConfigError(f"unknown --decoder {decoder!r}; choose from {', '.join(DECODERS)}")
    if decoder == "torchvision" and decode == "dct":
        raise ConfigError(
            "--decode dct is DALI's (libjpeg-turbo scaled decoding): use --decoder dali, or --decode fast"
        )


def _zoo_triton_refusal(spec) -> str | None:
    from .zoo_table import triton_refusal  # on use: it builds the torchvision module

    return triton_refusal(spec)
