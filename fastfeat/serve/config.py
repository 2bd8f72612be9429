"""``fastfeat serve``'s settings and their checks.

Checked before torch, DALI or the web stack are imported, as ``extract``'s arguments are, so a bad
flag is one line on stderr and exit code 2 at once.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from ..arguments import OUTPUT_DTYPE_NAMES, PRECISION_NAMES, check_compile_mode, check_decoder
from ..backends import backend_names
from ..errors import ConfigError
from ..graphs import check_cuda_graphs
from ..means import check_mean_file
from ..model_lookup import resolve_model
from ..models import parse_layers

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DEFAULT_MAX_BODY_MB = 32.0  # a few dozen phone photos per request; raise it for bigger multi-image posts
# Flat (exact) search below this many indexed rows, HNSW above: where a flat query over 4,096-dim
# float32 rows (1.65 us a row) costs as much as one image's forward pass (AlexNet fp32, 18.7 ms) on
# the 2-core dev box (benchmarks/index_threshold.py, benchmarks/results/index_threshold_cpu.json).
DEFAULT_EXACT_BELOW = 10_000
# A request that has no answer after this long gets 503 (its images leave the queue): a client behind a
# proxy learns at once that the server is overloaded or stuck, instead of hanging until its own timeout.
DEFAULT_REQUEST_TIMEOUT_S = 60.0


@dataclass
class ServeConfig:
    model: str = "caffenet"
    weights: str | None = None
    layers: str | list[str] | None = "relu7"
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    precision: str | None = None
    backend: str = "torch"
    cuda_graphs: str = "auto"  # auto, on or off (fastfeat.graphs)
    compile_mode: str | None = None  # torch.compile's mode for the compile backend (None: its default)
    pool: str | None = None  # --pool of a torchvision:/timm: model (fastfeat.zoo; None: avg)
    decoder: str | None = None  # --decoder (fastfeat.models.DECODERS; None: DALI where it is installed)
    dtype: str = "float32"  # the responses' default (``?dtype=`` overrides per request)
    max_batch: int = 64
    max_delay_ms: float = 5.0
    max_queue: int | None = None  # images admitted and not yet answered; default 4 × max_batch
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    max_pixels: int | None = None  # None: fastfeat.decode.DEFAULT_MAX_PIXELS (not imported here: it loads torch)
    mean_file: str | None = None
    threads: int | None = None
    index: str | None = None
    index_layer: str | None = None
    exact_below: int = DEFAULT_EXACT_BELOW
    token: str | None = None
    access_log: bool = False
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    @property
    def queue_limit(self) -> int:
        return self.max_queue if self.max_queue is not None else 4 * self.max_batch

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


def check_serve_config(cfg: ServeConfig) -> list[str]:
    """The served layers in forward order; ConfigError (one line) for anything wrong."""
    try:
        spec = resolve_model(cfg.model, cfg.pool)
        # A torchvision/timm model has no relu7: the default there is its own pooled feature.
        zoo_default = getattr(spec, "is_zoo", False) and cfg.layers == "relu7"
        layers = parse_layers(spec, None if zoo_default else cfg.layers)
    except (ValueError, KeyError) as exc:
        raise ConfigError(str(exc).strip("'\"")) from None
    check_mean_file(cfg.mean_file, spec.preprocess, spec.name)
    if cfg.weights is None:
        raise ConfigError("--weights is required: a .pth/.safetensors/.caffemodel file, or random:SEED")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535] (0: any free port), got {cfg.port}")
    try:
        ipaddress.ip_address(cfg.host)
    except ValueError:
        if cfg.host != "localhost":
            raise ConfigError(f"--host must be an IP address or localhost, got {cfg.host!r}") from None
    for flag, value in (("max-batch", cfg.max_batch), ("max-queue", cfg.max_queue), ("threads", cfg.threads),
                        ("max-pixels", cfg.max_pixels)):  # fmt: skip
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} must be >= 1, got {value}")
    if cfg.max_queue is not None and cfg.max_queue < cfg.max_batch:
        raise ConfigError(f"--max-queue ({cfg.max_queue}) must be >= --max-batch ({cfg.max_batch})")
    if not 0 <= cfg.max_delay_ms <= 10_000:
        raise ConfigError(f"--max-delay-ms must be in [0, 10000], got {cfg.max_delay_ms:g}")
    if not 0 < cfg.request_timeout_s <= 86_400:
        raise ConfigError(f"--request-timeout must be in (0, 86400] seconds, got {cfg.request_timeout_s:g}")
    if not cfg.max_body_mb > 0:
        raise ConfigError(f"--max-body-mb must be > 0, got {cfg.max_body_mb:g}")
    if cfg.exact_below < 0:
        raise ConfigError(f"--exact-below must be >= 0, got {cfg.exact_below}")
    if cfg.dtype not in OUTPUT_DTYPE_NAMES:
        raise ConfigError(f"unknown --dtype {cfg.dtype!r}; choose float16 or float32")
    if cfg.precision is not None and cfg.precision not in PRECISION_NAMES:
        raise ConfigError(f"unknown precision {cfg.precision!r}; choose from {', '.join(PRECISION_NAMES)}")
    if not _DEVICE.match(cfg.device):
        raise ConfigError(f"unknown device {cfg.device!r}; choose auto, cpu or cuda[:N]")
    if cfg.backend not in backend_names():
        raise ConfigError(f"unknown backend {cfg.backend!r}; choose from {', '.join(backend_names())}")
    check_cuda_graphs(cfg.cuda_graphs)
    check_compile_mode(cfg.compile_mode, cfg.backend)
    check_decoder(cfg.decoder)
    if cfg.token is not None and not cfg.token.strip():
        raise ConfigError("--token must not be empty")
    if cfg.index is not None:
        if not os.path.isfile(os.path.join(cfg.index, "manifest.json")):
            raise ConfigError(f"--index {cfg.index}: not an output directory of fastfeat extract (no manifest.json)")
        if cfg.index_layer is not None:
            try:
                (name,) = parse_layers(spec, cfg.index_layer)
            except ConfigError as exc:
                raise ConfigError(f"--index-layer: {exc}") from None
            if name not in layers:
                raise ConfigError(f"--index-layer {name} is not one of the served --layers {','.join(layers)}")
    elif cfg.index_layer is not None:
        raise ConfigError("--index-layer needs --index DIR")
    return layers


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback
