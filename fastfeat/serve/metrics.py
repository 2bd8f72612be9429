"""The server's Prometheus metrics (GET /metrics), in a registry of its own so that two servers in one
process (the tests) never share counters."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int, waiting: Callable[[], int], admitted: Callable[[], int]):
        disable_created_metrics()  # the *_created series (process-wide) only double the page here
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fastfeat_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)  # fmt: skip
        self.latency = Histogram(
            "fastfeat_request_seconds", "Request latency, body read to response", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.images = Counter("fastfeat_images", "Images answered, by outcome", ["outcome"], registry=r)
        self.admitted = Counter("fastfeat_admitted_images", "Images admitted to the batching queue", registry=r)
        self.errors = Counter("fastfeat_errors", "Refused requests and images, by kind", ["kind"], registry=r)
        # Powers of two up to max_batch: the bucket edges are the sizes batches are most often cut at.
        edges = sorted({float(1 << i) for i in range(max_batch.bit_length())} | {float(max_batch)})
        self.batch_size = Histogram("fastfeat_batch_size", "Images per forward pass", buckets=edges, registry=r)
        self.stage = Histogram(
            "fastfeat_batch_stage_seconds", "Time of a batch's decode and forward pass", ["stage"],
            buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        queue = Gauge("fastfeat_queue_images", "Images waiting for a batch", registry=r)
        queue.set_function(waiting)
        inflight = Gauge("fastfeat_inflight_images", "Images admitted and not yet answered (limit: --max-queue)", registry=r)  # fmt: skip
        inflight.set_function(admitted)

    def on_batch(self, size: int, decode_s: float, forward_s: float) -> None:
        self.batch_size.observe(size)
        self.stage.labels("decode").observe(decode_s)
        self.stage.labels("forward").observe(forward_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
