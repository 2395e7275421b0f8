"""What only the agent knows: a session it ends because the apiserver went silent."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

from rune.cli.devstack import free_port

from tests.conftest import Rune, start_stack
from tests.test_audit_e2e import stream_events
from tests.test_metrics_e2e import scrape, value
from tests.test_recording_e2e import _alive

SERVICES = [{"name": "api", "namespace": "default", "replicas": 1,
             "command": ["sh", "-c", "exec sleep 2147483647"]}]


def test_agent_audits_a_session_it_ends_when_the_apiserver_is_lost(tmp_path):
    """A frozen apiserver: the agent kills the command and publishes session.failed itself."""
    metrics_port = free_port()
    stack = start_stack(tmp_path, agents={"g1": SERVICES},
                        api_extra={"heartbeat": 0.3, "lost_after": 3},
                        agent_extra={"metrics_listen": f"127.0.0.1:{metrics_port}"})
    api = stack.procs["apiserver"]
    try:
        marker = f"rune-lost-{uuid.uuid4().hex[:8]}"
        proc = Rune(stack).popen("exec", "api", "sh", "-c", f"sleep 120; echo {marker}",
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
                e["event"] == "session.started" for e in stream_events(stack.nats_url)):
            time.sleep(0.05)
        assert _alive(marker, besides=proc.pid)
        os.kill(api.pid, signal.SIGSTOP)
        try:
            found: list[dict] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not found:
                found = [e for e in stream_events(stack.nats_url)
                         if e.get("source") == "agent"]
                time.sleep(0.1)
        finally:
            os.kill(api.pid, signal.SIGCONT)
        assert len(found) == 1
        event = found[0]
        assert event["event"] == "session.failed" and event["version"] == 1
        assert event["agent"] == "g1" and event["instance"] == "api-instance-g1-0"
        assert event["user"] == "anonymous" and event["code"] == "unavailable"
        assert "apiserver lost" in event["reason"]
        assert event["argv"][:2] == ["sh", "-c"]
        assert not _alive(marker, besides=proc.pid)
        assert proc.wait(timeout=30) == 255
        metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert value(metrics, "rune_agent_heartbeats_missed_total") == 1
        assert value(metrics, "rune_agent_sessions_total", outcome="lost") == 1
    finally:
        stack.stop()
