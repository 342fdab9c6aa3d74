"""Prometheus metrics of one service, on its own registry (so that one process can hold several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Request latency buckets (seconds): a few ms on a GPU to tens of seconds for big images on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """Requests and errors by endpoint and code, queue depth, batch sizes, and latency histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pacl_serve_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "code"],
            registry=r,
        )
        self.errors = Counter(
            "pacl_serve_errors",
            "Requests answered with an error, by status code and kind",
            ["code", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "pacl_serve_request_seconds",
            "Time from request to answer",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("pacl_serve_queue_depth", "Requests admitted and waiting for the model", registry=r)
        self.body_readers = Gauge("pacl_serve_body_readers", "Requests reading their bodies now", registry=r)
        self.queue_wait = Histogram(
            "pacl_serve_queue_wait_seconds", "Time a job waited in the queue", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_images = Histogram(
            "pacl_serve_batch_images", "Images per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "pacl_serve_batch_seconds", "Model time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.dropped = Counter(
            "pacl_serve_dropped", "Timed-out requests whose work was dropped, by stage", ["stage"], registry=r
        )

    def text(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
