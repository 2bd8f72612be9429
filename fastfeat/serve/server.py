"""Load the model (and index), bind, and run the app under uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import socket
import sys
import time
from contextlib import redirect_stderr

from ..caveats import random_weights_note
from ..errors import ConfigError
from .config import ServeConfig, check_serve_config, is_loopback

LISTEN_BACKLOG = 2048  # connections the kernel queues while every worker is busy: a burst waits, not refused


def _bind(host: str, port: int) -> socket.socket:
    """Bind now, listen once the model is loaded: a port in use fails in a second, not after the load,
    and no connection is accepted before the server can answer it."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(cfg: ServeConfig) -> None:
    layers = check_serve_config(cfg)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn

        if cfg.index:
            import faiss  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"fastfeat serve needs the serve extra ({exc.name} is missing): pip install 'fastfeat[serve]'") from None  # fmt: skip
    if not is_loopback(cfg.host) and not cfg.token:
        print(f"fastfeat serve: warning: listening on {cfg.host} without --token: anyone who reaches it can use it",
              file=sys.stderr)  # fmt: skip
    sock = _bind(cfg.host, cfg.port)
    t0 = time.perf_counter()

    from ..console import console
    from .app import create_app
    from .batching import Batcher
    from .engine import Engine
    from .index import load_index
    from .metrics import Metrics

    engine = Engine(cfg, layers)
    index = load_index(cfg.index, engine.metadata, cfg.index_layer, cfg.exact_below) if cfg.index else None
    warm_s = engine.warm_up()
    batcher = Batcher(engine.decode, engine.forward, cfg.max_batch, cfg.max_delay_ms / 1000, cfg.queue_limit)
    metrics = Metrics(cfg.max_batch, lambda: batcher.waiting, lambda: batcher.admitted)
    batcher.on_batch = metrics.on_batch
    app = create_app(cfg, engine, batcher, metrics, index)
    sock.listen(LISTEN_BACKLOG)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    what = f"{engine.spec.name} {','.join(layers)}, {engine.precision}, {cfg.backend} on {engine.device}"
    where = f"; index {len(index):,} rows of {index.layer}, {index.kind}" if index else ""
    print(f"fastfeat serve: listening on {url} ({what}; batches of up to {cfg.max_batch} within "
          f"{cfg.max_delay_ms:g} ms{where}; ready in {time.perf_counter() - t0:.1f} s, warm-up {warm_s:.1f} s)",
          flush=True)  # fmt: skip
    if (note := random_weights_note(cfg.weights)) is not None:
        print(f"fastfeat serve: warning: {note}", flush=True)
    # The decoder captures file descriptor 2 while it decodes (to attribute its native warnings to an
    # image): the server's own logging must bypass it, as extract's progress bar does.
    with redirect_stderr(console()):
        config = uvicorn.Config(
            app, log_level="info" if cfg.access_log else "warning", access_log=cfg.access_log,
            timeout_graceful_shutdown=10, server_header=False,
        )  # fmt: skip
        uvicorn.Server(config).run(sockets=[sock])
