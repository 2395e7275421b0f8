"""Fan-out at scale: `--all true` over 200 instances on 20 real agents (NATS clients)."""

from __future__ import annotations

import json

import pytest
from conftest import Rune
from multi_agent import start_fleet
from rune.cli.devstack import Stack, free_port

AGENTS, REPLICAS = 20, 10


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("scale"), nats_port=free_port(), api_port=free_port())
    try:
        stack.start_nats()
        stack.start_apiserver()
        start_fleet(stack, AGENTS, REPLICAS, processes=4)  # 5 agents per process
        yield Rune(stack)
    finally:
        stack.stop()


def test_all_true_over_200_instances(big):
    """Every one of 200 instances on 20 agents reports exit 0, exactly once."""
    result = big("exec", "fleet", "--all", "--json", "true", timeout=240)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert records[0]["type"] == "targets" and len(records[0]["instances"]) == 200
    finals = records[1:]
    assert all(r["type"] == "result" for r in finals)
    expected = {f"fleet-instance-m{a:03d}-{i}" for a in range(AGENTS) for i in range(REPLICAS)}
    assert sorted(r["instance"] for r in finals) == sorted(expected)
    assert {(r["status"], r["exit_code"]) for r in finals} == {("exited", 0)}
    assert {r["agent"] for r in finals} == {f"m{a:03d}" for a in range(AGENTS)}
    assert result.stderr.decode().splitlines()[-1] == "200 instances: 200 exited 0"


def test_selector_over_the_fleet_with_output(big):
    """A label selector across agents: each matching instance's output exactly once."""
    result = big("exec", "fleet", "-l", "rack=r1", "--no-prefix", "sh", "-c",
                 "echo $RUNE_INSTANCE", timeout=240)
    assert result.returncode == 0
    expected = sorted(f"fleet-instance-m{a:03d}-{i}" for a in range(AGENTS) if a % 4 == 1
                      for i in range(REPLICAS))
    assert sorted(result.stdout.decode().splitlines()) == expected
