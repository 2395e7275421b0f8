"""The apiserver's Prometheus metrics: sessions, bytes, setup latency, flow control."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rune.metrics import PublisherCollector

SETUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTCOMES = ("success", "nonzero", "failed", "denied")


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.active = Gauge("rune_sessions_active", "sessions running now", registry=r)
        self.sessions = Counter("rune_sessions", "sessions by outcome: success (exit 0), "
                                "nonzero (other exit or signal), failed, denied",
                                ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.sessions.labels(outcome)
        self.bytes = Counter("rune_session_bytes", "session payload bytes; in = to the "
                             "command (stdin), out = from it", ["direction"], registry=r)
        self.setup = Histogram("rune_session_setup_seconds", "request received to session "
                               "started (auth, resolve, agent open)", buckets=SETUP_BUCKETS,
                               registry=r)
        self.retransmits = Counter("rune_flow_retransmits", "frames sent again to agents",
                                   registry=r)
        self.stalls = Counter("rune_flow_stalls", "sends that waited for credit (agent or "
                              "command slow to read stdin)", registry=r)
        self.heartbeats_missed = Counter("rune_heartbeats_missed", "sessions ended because "
                                         "the agent's heartbeats stopped", registry=r)
        self.killed = Counter("rune_sessions_killed", "sessions ended by `rune sessions kill`",
                              registry=r)

    def watch_publisher(self, prefix: str, publisher: object) -> None:
        self.registry.register(PublisherCollector(prefix, lambda: publisher))
