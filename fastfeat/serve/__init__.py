"""``fastfeat serve``: DeCAF features over HTTP, dynamically batched, with nearest neighbours over an
extracted dataset and a page to try it (see README, "Serving features").

    config.py    settings and their checks (no heavy imports)
    engine.py    the model: extract's weights, header check, DALI decoder, backend and forward stage
    batching.py  coalescing concurrent requests' images into batches (decode and forward threads)
    index.py     nearest neighbours over an extract output directory (faiss)
    codec.py     request bodies in, JSON / .npy / Arrow IPC out, error bodies
    metrics.py   Prometheus metrics
    app.py       the HTTP routes (FastAPI)
    server.py    loading, binding and running it all (uvicorn)
    page.html    the page at /
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "serve"]


def serve(cfg: ServeConfig) -> None:
    """Run the server until SIGINT/SIGTERM; see fastfeat.serve.server."""
    from .server import serve as _serve

    _serve(cfg)
