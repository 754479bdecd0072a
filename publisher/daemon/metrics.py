"""Prometheus `/metrics` and `/healthz` on a loopback port, read at scrape time.

The counters already live where the work happens (the broker's I/O thread, the
daemon thread, the spool); a collector reads them when Prometheus asks, so the
hot path pays nothing for metrics but one bucket increment per confirmed message.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from virtpub.core.latency import LatencyHistogram

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Counters:
    """What the collector reads; callables, so each scrape sees the current values."""

    received: Callable[[], Mapping[tuple[str, str], int]]
    """(backend, event type) to signals taken from the drivers."""
    broker: Callable[[], Mapping[str, int]]
    """published, confirmed, nacked, returned, reconnects."""
    dropped: Callable[[], Mapping[str, int]]
    """reason (queue_full, spool_full) to events dropped."""
    spool: Callable[[], tuple[int, int]]
    """Unconfirmed messages and the bytes they take."""
    backend_reconnects: Callable[[], int]
    requests: Callable[[], Mapping[str, int]]
    """outcome (capabilities_answered, snapshot_accepted, rejected) to requests."""
    latency: LatencyHistogram


class VirtpubCollector(Collector):
    def __init__(self, counters: Counters) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        c = self._counters
        received = CounterMetricFamily(
            "virtpub_events_received",
            "Signals taken from the drivers, per backend and event type.",
            labels=["backend", "type"],
        )
        for (backend, kind), count in sorted(dict(c.received()).items()):
            received.add_metric([backend, kind], count)
        yield received
        for name, value in sorted(c.broker().items()):
            yield CounterMetricFamily(
                f"virtpub_messages_{name}", f"Messages {name} (broker side).", value=value
            )
        dropped = CounterMetricFamily(
            "virtpub_events_dropped", "Events dropped, per reason.", labels=["reason"]
        )
        for reason, count in sorted(c.dropped().items()):
            dropped.add_metric([reason], count)
        yield dropped
        messages, size = c.spool()
        yield GaugeMetricFamily(
            "virtpub_spool_messages", "Messages in the spool, not yet confirmed.", value=messages
        )
        yield GaugeMetricFamily(
            "virtpub_spool_bytes", "What the spooled messages take.", value=size
        )
        yield CounterMetricFamily(
            "virtpub_backend_reconnects", "Reconnects to a backend.", value=c.backend_reconnects()
        )
        requests = CounterMetricFamily(
            "virtpub_requests",
            "Capabilities and snapshot requests, per outcome.",
            labels=["outcome"],
        )
        for outcome, count in sorted(c.requests().items()):
            requests.add_metric([outcome], count)
        yield requests
        yield HistogramMetricFamily(
            "virtpub_publish_latency_seconds",
            "From receiving a signal to the broker's ack of its message.",
            buckets=c.latency.buckets(),
            sum_value=c.latency.total,
        )


Health = Callable[[], Mapping[str, tuple[bool, str]]]
"""Check name (libvirt backends, broker, spool) to (healthy, one line)."""


class MetricsServer:
    """`/metrics` and `/healthz` on their own thread; never in the way of publishing."""

    def __init__(self, address: tuple[str, int], counters: Counters, health: Health) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(VirtpubCollector(counters))
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif self.path == "/healthz":
                    checks = health()
                    healthy = all(ok for ok, _ in checks.values())
                    body = {
                        "status": "ok" if healthy else "unhealthy",
                        "checks": {k: {"ok": ok, "detail": d} for k, (ok, d) in checks.items()},
                    }
                    self._send(200 if healthy else 503, "application/json", json.dumps(body))
                else:
                    self._send(404, "text/plain", "try /metrics or /healthz\n")

            def _send(self, code: int, content_type: str, body: bytes | str) -> None:
                data = body.encode() if isinstance(body, str) else body
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics: " + format, *args)

        self._server = ThreadingHTTPServer(address, Handler)
        self._server.daemon_threads = True
        self.address = self._server.server_address
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics and /healthz", *self.address[:2])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
