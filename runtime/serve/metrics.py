"""Prometheus metrics of one app, in its own registry (two apps in one process do not collide).

Rates (images/s, requests/s) are what Prometheus computes from the counters: rate(sd_images_total[1m]).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.queue = Gauge("sd_queue_depth", "requests waiting for the worker", ["model"], registry=registry)
        self.requests = Counter(
            "sd_requests", "HTTP generation requests by route and status", ["route", "status"], registry=registry
        )
        self.images = Counter("sd_images", "images generated", ["model"], registry=registry)
        self.loops = Counter("sd_denoise_loops", "denoising loops run (one per batch)", ["model"], registry=registry)
        self.batch_images = Histogram(
            "sd_batch_images",
            "images per denoising loop",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )
        self.cancelled = Counter(
            "sd_cancelled", "requests dropped or stopped, by reason", ["reason"], registry=registry
        )
        self.step_seconds = Histogram(
            "sd_step_seconds", "time of one denoising step", ["model"], buckets=_STEP_BUCKETS, registry=registry
        )
        self.request_seconds = Histogram(
            "sd_request_seconds",
            "time from arrival to response",
            ["route"],
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )

    def for_model(self, name: str) -> ModelMetrics:
        return ModelMetrics(self, name)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """The Batcher's observer for one model."""

    def __init__(self, metrics: Metrics, model: str):
        self._metrics, self._model = metrics, model

    def queue_depth(self, depth: int) -> None:
        self._metrics.queue.labels(self._model).set(depth)

    def batch_started(self, jobs) -> None:
        self._metrics.loops.labels(self._model).inc()
        self._metrics.batch_images.labels(self._model).observe(sum(job.images for job in jobs))

    def step_done(self, seconds: float) -> None:
        self._metrics.step_seconds.labels(self._model).observe(seconds)

    def batch_finished(self, jobs, seconds: float, succeeded: bool) -> None:
        if not succeeded:
            return
        done = sum(job.images for job in jobs if not job.cancelled)
        self._metrics.images.labels(self._model).inc(done)
