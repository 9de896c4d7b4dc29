"""Prometheus metrics, prefix `blip2_`, base units. One registry per app, so tests can run several apps.

Labels stay low-cardinality: the route template (unknown paths become "other"), the status code, the task.
`blip2_queue_depth` is what the Kubernetes HPA scales on; keep its name.
"""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.engine.batching import BatcherMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class Metrics(BatcherMetrics):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "blip2_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "blip2_request_duration_seconds",
            "Request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "blip2_queue_wait_seconds",
            "Time from queueing to the start of the batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "blip2_inference_duration_seconds",
            "Model time per batch",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "blip2_batch_size", "Requests per batch", ["task"], buckets=BATCH_BUCKETS, registry=r
        )
        self.depth = Gauge("blip2_queue_depth", "Requests waiting for a batch", registry=r)
        self.in_flight = Gauge("blip2_requests_in_flight", "HTTP requests being handled", registry=r)
        self.generated_tokens = Counter("blip2_generated_tokens", "Tokens generated", registry=r)
        self.dropped_requests = Counter(
            "blip2_dropped_requests", "Queued requests dropped before compute", ["reason"], registry=r
        )
        self.batch_isolations = Counter(
            "blip2_batch_isolations",
            "Failed batches re-run in halves to find the request(s) at fault",
            registry=r,
        )
        self.isolation_calls = Counter(
            "blip2_batch_isolation_calls", "Extra model calls made to isolate failed requests", registry=r
        )
        self.isolated_failures = Counter(
            "blip2_isolated_failed_requests",
            "Requests that failed once isolated from their batch (the others were answered)",
            registry=r,
        )
        self.vision_images = Counter(
            "blip2_vision_images", "Images through the ViT, or reused from its cache", ["source"], registry=r
        )
        self.load_seconds = Gauge(
            "blip2_model_load_seconds", "Time taken to load each model", ["model"], registry=r
        )
        self.ready = Gauge("blip2_ready", "1 when the server takes requests", registry=r)
        if torch.cuda.is_available():
            gpu = Gauge("blip2_gpu_memory_allocated_bytes", "GPU memory held by tensors", registry=r)
            gpu.set_function(torch.cuda.memory_allocated)
            peak = Gauge("blip2_gpu_memory_peak_bytes", "Peak GPU memory held by tensors", registry=r)
            peak.set_function(torch.cuda.max_memory_allocated)

    def queue_depth(self, depth: int) -> None:
        self.depth.set(depth)

    def queue_wait(self, seconds: float) -> None:
        self.queue_seconds.observe(seconds)

    def batch(self, task: str, size: int, seconds: float) -> None:
        self.batch_size.labels(task).observe(size)
        self.inference_seconds.labels(task).observe(seconds)

    def dropped(self, reason: str) -> None:
        self.dropped_requests.labels(reason).inc()

    def isolated(self, extra_calls: int, failed: int) -> None:
        self.batch_isolations.inc()
        self.isolation_calls.inc(extra_calls)
        self.isolated_failures.inc(failed)

    def vision(self, computed: int, reused: int) -> None:
        self.vision_images.labels("computed").inc(computed)
        self.vision_images.labels("reused").inc(reused)

    def render(self) -> bytes:
        return generate_latest(self.registry)
