"""Serving a Prometheus registry over HTTP, the same way in every program."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


def serve(listen: str, registry: CollectorRegistry) -> tuple[str, int]:
    """Serves /metrics on `listen` ("host:port", port 0 picks one) from a thread."""
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    bound = server.server_address
    log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
    return bound[0], bound[1]


class PublisherCollector(Collector):
    """Exports a BufferedPublisher's counters (published, dropped, failures, buffered)."""

    def __init__(self, prefix: str, stats: Callable[[], object]) -> None:
        self.prefix = prefix
        self.stats = stats

    def collect(self) -> Iterator[object]:
        p = self.stats()
        if p is None:
            return
        for name, value, text in (
            ("published", p.published, "messages stored in JetStream"),
            ("dropped", p.dropped, "messages lost (buffer full or shutdown)"),
            ("publish_failures", p.failures, "failed publish attempts (retried)"),
        ):
            yield CounterMetricFamily(f"{self.prefix}_{name}", text, value=value)
        yield GaugeMetricFamily(f"{self.prefix}_buffered", "messages waiting to be stored",
                                value=p.buffered)
