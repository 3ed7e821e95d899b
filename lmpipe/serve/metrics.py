"""The served model's Prometheus metrics (official client library), one set per server process.

Names follow Prometheus' conventions (counters end in `_total`, durations in `_seconds`). With
`--workers N` every worker writes its values to `PROMETHEUS_MULTIPROC_DIR` and a scrape of any
worker sums the counters and histograms of all of them; gauges report the highest worker's
value (each worker watches drift over its own window).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# 1 ms .. 10 s: one short review on an int8 model takes ~2 ms, a queue of 32 long ones seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # texts per model call
ERROR_KINDS = (
    "unauthorized",
    "body_too_large",
    "too_many_texts",
    "text_too_long",
    "bad_json",
    "bad_request",
    "overloaded",
    "internal",
)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class ServeMetrics:
    """Request, latency, batch, prediction and drift metrics; `exposition()` is the /metrics body."""

    def __init__(self, labels: Sequence[str], statistics: Sequence[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lmpipe_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.errors = Counter("lmpipe_request_errors", "Requests refused or failed, by kind", ["kind"], registry=r)
        self.latency = Histogram(
            "lmpipe_request_latency_seconds",
            "Time from request to response, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "lmpipe_batch_size", "Texts per model call (micro-batches of requests)", buckets=BATCH_BUCKETS, registry=r
        )
        self.texts = Counter("lmpipe_texts", "Texts classified", registry=r)
        self.predictions = Counter("lmpipe_predictions", "Predicted class of each text", ["label"], registry=r)
        for label in labels:
            self.predictions.labels(label=label)  # every class at 0 from the start: shares are well defined
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)
        gauge = {"multiprocess_mode": "max"}
        self.drift_psi = Gauge(
            "lmpipe_drift_psi",
            "Population-stability index of the last window of inputs against the training split",
            ["statistic"],
            registry=r,
            **gauge,
        )
        self.drift_alert = Gauge(
            "lmpipe_drift_alert", "1 while a statistic's PSI is above its threshold", ["statistic"], registry=r, **gauge
        )
        self.drift_alerts = Counter(
            "lmpipe_drift_alerts", "Times a statistic's PSI crossed its threshold upwards", ["statistic"], registry=r
        )
        self.drift_threshold = Gauge("lmpipe_drift_threshold", "PSI alert threshold", registry=r, **gauge)
        self.drift_window = Gauge("lmpipe_drift_window_texts", "Texts in the drift window", registry=r, **gauge)
        for name in statistics:
            self.drift_alert.labels(statistic=name).set(0)
            self.drift_alerts.labels(statistic=name)
        self.model_info = Gauge(
            "lmpipe_model_info",
            "The served model (always 1): backend, git revision, DVC md5 of its folder",
            ["backend", "revision", "md5"],
            registry=r,
            **gauge,
        )

    def exposition(self) -> bytes:
        """The Prometheus text format of this process, or of every worker in multiprocess mode."""
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
