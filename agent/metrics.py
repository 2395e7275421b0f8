"""The agent's Prometheus metrics: its sessions, bytes, spawn latency and flow control."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rune.metrics import PublisherCollector

SETUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OUTCOMES = ("exited", "aborted", "lost", "unavailable", "refused")
CONTAINER_ROUTES = ("parked", "runc", "engine")


class AgentMetrics:
    def __init__(self, active: Callable[[], int],
                 registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.active = Gauge("rune_agent_sessions_active", "sessions running on this agent",
                            registry=r)
        self.active.set_function(active)
        self.sessions = Counter(
            "rune_agent_sessions", "sessions by outcome: exited (the command ended), aborted "
            "(closed, killed or timed out), lost (apiserver heartbeats stopped), unavailable "
            "(command not found or not executable), refused (could not open)",
            ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.sessions.labels(outcome)
        self.bytes = Counter("rune_agent_session_bytes", "payload bytes; in = stdin to "
                             "commands, out = their output", ["direction"], registry=r)
        self.setup = Histogram("rune_agent_session_setup_seconds", "exec request received to "
                               "command spawned", buckets=SETUP_BUCKETS, registry=r)
        self.retransmits = Counter("rune_agent_flow_retransmits", "output frames sent again",
                                   registry=r)
        self.stalls = Counter("rune_agent_flow_stalls", "output sends that waited for credit "
                              "(a slow reader holding the command back)", registry=r)
        self.container_starts = Counter(
            "rune_agent_container_exec_starts", "container execs by how their command "
            "started: parked (the start parked in the container), runc (runc exec), engine "
            "(the Docker Engine's exec API)", ["route"], registry=r)
        for route in CONTAINER_ROUTES:
            self.container_starts.labels(route)
        self.heartbeats_missed = Counter("rune_agent_heartbeats_missed", "sessions ended "
                                         "because the apiserver's heartbeats stopped",
                                         registry=r)

    def container_started(self, route: str) -> None:
        self.container_starts.labels(route).inc()

    def watch_publisher(self, prefix: str, publisher: object) -> None:
        self.registry.register(PublisherCollector(prefix, lambda: publisher))

    def session_done(self, session: object) -> str:
        """Counts one finished ExecSession (agent/session.py); returns its outcome."""
        link = session.link
        if session.result is not None:
            outcome = "exited"
        elif link.lost is not None:
            outcome = "lost"
            self.heartbeats_missed.inc()
        else:
            outcome = "aborted"
        self.sessions.labels(outcome).inc()
        self.bytes.labels("in").inc(link.bytes_in)
        self.bytes.labels("out").inc(link.bytes_out)
        self.retransmits.inc(link.sender.retransmits)
        self.stalls.inc(link.sender.stalls)
        return outcome
