"""A generated 3-node NATS cluster carries Rune: apiserver and agent on different nodes."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest
from conftest import Rune
from rune.broker_config.generate import generate
from rune.cli.devstack import Stack, free_port, nats_server_binary, port_open, wait_until

from rune.natsconn import connect
from rune.subjects import Subjects


def _free_run(count: int) -> int:
    """A first port with COUNT free consecutive ports after it (loopback)."""
    for _ in range(50):
        base = free_port()
        if base + count < 65535 and all(_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no run of free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _jetstream_ready(url: str, seed: str) -> bool:
    nc = await connect(url, "probe", seed, inbox_prefix=Subjects().inbox("apiserver"))
    try:
        await nc.jetstream().account_info()
        return True
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    conf = tmp / "conf"
    client, routes = _free_run(3), _free_run(3)
    generate(conf, ["a1"], cluster=3, client_port=client, cluster_port=routes)
    logs = [open(tmp / f"node-{i + 1}.log", "wb") for i in range(3)]
    nodes = [subprocess.Popen([nats_server_binary(), "-c", str(conf / f"node-{i + 1}.conf")],
                              stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    stack = Stack(tmp, nats_port=client, api_port=free_port())
    try:
        for i in range(3):
            wait_until(lambda i=i: port_open(client + i), f"cluster node {i + 1}",
                       proc=nodes[i])
        url = [f"nats://127.0.0.1:{client + i}" for i in range(3)]
        # A JetStream cluster answers API calls only once it has elected a meta leader.
        wait_until(lambda: asyncio.run(_jetstream_ready(url[0], str(conf / "apiserver.nk"))),
                   "JetStream meta leader", timeout=30)
        stack.start_apiserver({"nats_url": url[0], "auth": {"enabled": False},
                               "nats_nkey_seed_file": str(conf / "apiserver.nk")})
        stack.start_agent("a1", [{"name": "api", "command": ["sleep", "2147483647"]}],
                          {"nats": {"url": f"{url[1]},{url[2]}",
                                    "nkey_seed_file": str(conf / "agent-a1.nk")}})
        stack.nodes = nodes
        yield stack
    finally:
        stack.stop()
        for node in nodes:
            node.terminate()
            node.wait(timeout=10)
        for log in logs:
            log.close()


def test_exec_crosses_cluster_nodes(cluster):
    """The apiserver on node 1 reaches the agent on node 2: output and exit code arrive."""
    result = Rune(cluster)("exec", "api", "sh", "-c", "echo across; exit 4")
    assert result.stdout == b"across\n"
    assert result.returncode == 4


def test_agent_fails_over_to_another_node(cluster):
    """With node 2 gone, the agent reconnects to node 3 and exec works again."""
    cluster.nodes[1].terminate()
    cluster.nodes[1].wait(timeout=10)
    rune = Rune(cluster)
    # Bounded: the agent reconnects within a second; the cluster re-elects if needed.
    for _ in range(60):
        result = rune("exec", "api", "echo", "still here")
        if result.returncode == 0:
            break
    assert result.stdout == b"still here\n", result.stderr


def test_cluster_needs_three_nodes(tmp_path):
    """Fewer than three nodes is refused: JetStream could not elect a leader."""
    with pytest.raises(ValueError, match="at least 3"):
        generate(tmp_path, ["a1"], cluster=2)
