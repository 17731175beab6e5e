"""What ``GET /metrics`` reports, in Prometheus' text format (written by ``prometheus_client``).

Each server has its own registry, so two servers in one process (tests, Ray replicas) never mix
their counts. The queue and engine gauges are read when Prometheus scrapes, not kept up to date.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .service import GenerationService

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# ok: answered; failed: the generation raised (e.g. NaN); cancelled: the client left or the server
# stopped; invalid: bad settings (422); refused: the queue was full (429) or the server was stopping.
OUTCOMES = ("ok", "failed", "cancelled", "invalid", "refused")

# Seconds from arrival to result: a tiny model on a CPU answers in milliseconds, xAR-H at full
# batch on a GPU in a minute.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class _EngineCollector:
    """The queue and the engine, read at scrape time."""

    def __init__(self, service: "GenerationService"):
        self.service = service

    def collect(self):
        service, engine = self.service, self.service.engine
        yield GaugeMetricFamily("xar_queue_length", "Requests waiting for engine rows", value=service.queue_length)
        yield GaugeMetricFamily("xar_rows_in_use", "Engine rows (KV-cache slots) held by running requests",
                                value=service.rows_in_use)
        yield GaugeMetricFamily("xar_max_rows", "Engine rows in all (--max-rows)", value=engine.max_rows)
        yield CounterMetricFamily("xar_network_calls", "Network calls the engine ran", value=engine.num_calls)
        yield CounterMetricFamily("xar_network_rows", "Rows computed, summed over network calls", value=engine.num_rows)
        yield GaugeMetricFamily("xar_rows_per_network_call", "Mean rows per network call since the start",
                                value=engine.num_rows / engine.num_calls if engine.num_calls else 0.0)


class ServerMetrics:
    """Requests by outcome and their latency, plus the gauges of the service it ``watch``-es."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self._requests = Counter("xar_requests", "Requests by outcome", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self._requests.labels(outcome)  # every outcome shows, at 0 until it happens
        self._latency = Histogram("xar_request_latency_seconds", "Seconds from arrival to result, answered requests",
                                  buckets=LATENCY_BUCKETS, registry=self.registry)

    def watch(self, service: "GenerationService") -> None:
        self.registry.register(_EngineCollector(service))

    def count(self, outcome: str, latency: float | None = None) -> None:
        self._requests.labels(outcome).inc()
        if latency is not None:
            self._latency.observe(latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)
