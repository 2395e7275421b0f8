"""Prometheus metrics of the apiserver and the agent move as sessions run (scraped over HTTP)."""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rune.cli.devstack import free_port

from tests.conftest import Rune, start_stack

SERVICES = [{"name": "api", "namespace": "default", "replicas": 1,
             "command": ["sh", "-c", "exec sleep 2147483647"]}]


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    api_port, agent_port = free_port(), free_port()
    # A small window makes a 2 MB output wait for credit: flow-control stalls become visible.
    stack = start_stack(tmp_path_factory.mktemp("metered"), agents={"m1": SERVICES},
                        api_extra={"metrics_listen": f"127.0.0.1:{api_port}",
                                   "window": 65536},
                        agent_extra={"metrics_listen": f"127.0.0.1:{agent_port}"})
    yield stack, f"http://127.0.0.1:{api_port}/metrics", f"http://127.0.0.1:{agent_port}/metrics"
    stack.stop()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_as_sessions_run(metered):
    """Outcomes, bytes, setup latency and stalls are counted on both servers."""
    stack, api_url, agent_url = metered
    rune = Rune(stack)
    api0, agent0 = scrape(api_url), scrape(agent_url)
    assert rune("exec", "api", "sh", "-c", "head -c 2000000 /dev/zero").returncode == 0
    assert rune("exec", "api", "sh", "-c", "exit 3").returncode == 3
    assert rune("exec", "nope", "true").returncode == 255
    assert rune("exec", "api", "cat", input=b"12345").stdout == b"12345"
    api1 = scrape(api_url)
    # The agent closes its books once the apiserver acknowledged the exit, a moment after
    # the CLI already returned: wait for that (bounded) before reading its counters.
    deadline = time.monotonic() + 10
    while value(agent1 := scrape(agent_url), "rune_agent_sessions_active") != 0:
        assert time.monotonic() < deadline, "agent still reports an active session"
        time.sleep(0.02)

    def delta(now: dict, before: dict, name: str, **labels: str) -> float:
        return value(now, name, **labels) - value(before, name, **labels)

    assert delta(api1, api0, "rune_sessions_total", outcome="success") == 2
    assert delta(api1, api0, "rune_sessions_total", outcome="nonzero") == 1
    assert delta(api1, api0, "rune_sessions_total", outcome="denied") == 1
    assert delta(api1, api0, "rune_session_bytes_total", direction="out") == 2000005
    assert delta(api1, api0, "rune_session_bytes_total", direction="in") == 5
    assert delta(api1, api0, "rune_session_setup_seconds_count") == 3
    assert value(api1, "rune_sessions_active") == 0
    assert delta(api1, api0, "rune_audit_events_published_total") >= 7
    assert value(api1, "rune_audit_events_dropped_total") == 0
    assert delta(agent1, agent0, "rune_agent_sessions_total", outcome="exited") == 3
    assert delta(agent1, agent0, "rune_agent_session_bytes_total", direction="out") == 2000005
    assert delta(agent1, agent0, "rune_agent_session_setup_seconds_count") == 3
    assert delta(agent1, agent0, "rune_agent_flow_stalls_total") > 0
    for name in ("rune_flow_retransmits_total", "rune_heartbeats_missed_total"):
        assert (name, ()) in api1
    for name in ("rune_agent_flow_retransmits_total", "rune_agent_heartbeats_missed_total"):
        assert (name, ()) in agent1


def test_active_gauges_follow_a_live_session(metered):
    """While a session runs both servers report it active; afterwards they do not."""
    stack, api_url, agent_url = metered
    before = value(scrape(api_url), "rune_sessions_total", outcome="nonzero")
    proc = Rune(stack).popen("exec", "api", "sleep", "30", stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
                value(scrape(api_url), "rune_sessions_active") == 1
                and value(scrape(agent_url), "rune_agent_sessions_active") == 1):
            time.sleep(0.05)
        assert value(scrape(api_url), "rune_sessions_active") == 1
        assert value(scrape(agent_url), "rune_agent_sessions_active") == 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and value(scrape(api_url), "rune_sessions_active"):
        time.sleep(0.05)
    assert value(scrape(api_url), "rune_sessions_active") == 0
    # The CLI forwards SIGTERM: the remote sleep dies of it, a non-zero outcome.
    assert value(scrape(api_url), "rune_sessions_total", outcome="nonzero") == before + 1
