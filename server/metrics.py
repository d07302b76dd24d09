"""Prometheus metrics of one server: calls, latency, batch sizes, errors, loaded versions,
and the standard process, platform and garbage collector metrics.

Each server has its own registry (several servers in one test process must not share
counters); ``bliss serve`` exposes it over HTTP on the metrics port.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # What prometheus_client's default registry would show (process_*, python_info,
        # python_gc_*): this registry is the server's own, so it registers them itself.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "bliss_requests",
            "Finished calls (a stream counts each request message), by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.errors = Counter(
            "bliss_errors",
            "Calls that ended with a status other than OK, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bliss_request_latency_seconds",
            "Time from receiving a request (message) to having its response, by method.",
            ["method"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_items = Histogram(
            "bliss_request_batch_items",
            "Items per scoring request, by index.",
            ["index"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.items = Counter(
            "bliss_scored_items",
            "Items scored, by index version.",
            ["version"],
            registry=self.registry,
        )
        self.encode_batch_images = Histogram(
            "bliss_encode_batch_images",
            "Images per encoder micro-batch (across concurrent requests).",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.unauthenticated = Counter(
            "bliss_unauthenticated_calls",
            "Calls refused for a missing or wrong bearer token.",
            registry=self.registry,
        )
        self.index_version = Gauge(
            "bliss_index_version_loaded",
            "The version number of each index that is being served.",
            ["index"],
            registry=self.registry,
        )
        self.index_loads = Counter(
            "bliss_index_loads",
            "Attempts to load an index version, by index and outcome (loaded, failed).",
            ["index", "outcome"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "bliss_inflight_requests", "Scoring calls being handled now.", registry=self.registry
        )


class MetricsEndpoint:
    """The /metrics HTTP server (a daemon thread)."""

    def __init__(self, metrics: ServerMetrics, host: str, port: int) -> None:
        self._server: WSGIServer
        self._server, self._thread = start_http_server(port, host, registry=metrics.registry)
        self.port = int(self._server.server_port)
        logger.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
