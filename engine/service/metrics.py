"""Prometheus metrics of one server (prometheus-client, a registry per app: no global state).

Generation requests balance: every request a generation route receives ends as exactly one of
succeeded, failed (reason: error, timeout, cancelled) or rejected (reason: invalid, queue_full,
draining, unauthorized, too_large), so ``received == succeeded + failed + rejected``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "sd_engine"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class ServiceMetrics:
    """The instruments; ``render()`` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.received = Counter(
            f"{PREFIX}_requests_received", "generation requests received", ["api"], registry=r
        )
        self.succeeded = Counter(
            f"{PREFIX}_requests_succeeded", "generation requests answered with images", ["api"], registry=r
        )
        self.failed = Counter(
            f"{PREFIX}_requests_failed",
            "accepted generation requests that ended without images",
            ["api", "reason"],
            registry=r,
        )
        self.rejected = Counter(
            f"{PREFIX}_requests_rejected",
            "generation requests refused before queueing",
            ["api", "reason"],
            registry=r,
        )
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "requests waiting (not running)", registry=r)
        self.running = Gauge(f"{PREFIX}_running_requests", "requests being generated", registry=r)
        self.batch_images = Histogram(
            f"{PREFIX}_batch_images",
            "images per UNet batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
            registry=r,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "arrival to start of generation",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generation = Histogram(
            f"{PREFIX}_generation_seconds", "one batch's generation time", buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            f"{PREFIX}_request_seconds",
            "arrival to answer of generation requests",
            ["api"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(f"{PREFIX}_images", "images generated", registry=r)
        self.steps = Counter(f"{PREFIX}_unet_steps", "UNet evaluations (batched ones count once)", registry=r)
        self.steps_per_second = Gauge(
            f"{PREFIX}_steps_per_second", "UNet steps per second of the last batch", registry=r
        )
        self.ready = Gauge(
            f"{PREFIX}_ready", "1 when the default engine is loaded and not draining", registry=r
        )

    def track_queue(self, depth: Callable[[], float], running: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)
        self.running.set_function(running)

    def observe_batch(self, images: int, seconds: float, steps: int) -> None:
        self.batch_images.observe(images)
        self.generation.observe(seconds)
        self.images.inc(images)
        self.steps.inc(steps)
        if seconds > 0:
            self.steps_per_second.set(steps / seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
