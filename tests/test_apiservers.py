"""Two apiservers as one, on a 3-node NATS cluster with two agents: sessions listed and
killed from either, per-user limits across both, a dead apiserver's sessions forgotten."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from rune.apiserver.tokens import new_token
from rune.broker_config.generate import generate
from rune.cli.devstack import Stack, dev_auth, free_port, nats_server_binary, port_open, wait_until

from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc
from rune.subjects import Subjects
from tests.test_audit_e2e import stream_events
from tests.test_broker_cluster import _free_run, _jetstream_ready

SLEEP = ["sleep", "2147483647"]
MAX_PER_USER = 4


class Apiservers:
    def __init__(self, stack: Stack, token: str, addresses: dict[str, str],
                 nats_url: str = "", conf: Path | None = None) -> None:
        self.stack = stack
        self.token = token
        self.addresses = addresses
        self.nats_url = nats_url
        self.conf = conf

    def audit(self) -> list[dict]:
        return stream_events(self.nats_url, nkeys_seed=str(self.conf / "audit-reader.nk"),
                             inbox_prefix=Subjects().inbox("audit"))

    def metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.token}"),)

    def list_sessions(self, via: str) -> list[pb.SessionInfo]:
        with grpc.insecure_channel(self.addresses[via]) as channel:
            reply = pb_grpc.ExecServiceStub(channel).ListSessions(
                pb.ListSessionsRequest(all_namespaces=True), metadata=self.metadata(),
                timeout=30)
        return [s for s in reply.sessions if s.state == "active"]

    def kill(self, via: str, session_id: str, reason: str) -> None:
        with grpc.insecure_channel(self.addresses[via]) as channel:
            pb_grpc.ExecServiceStub(channel).KillSession(
                pb.KillSessionRequest(session_id=session_id, reason=reason),
                metadata=self.metadata(), timeout=30)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("apiservers")
    conf = tmp / "conf"
    client, routes = _free_run(3), _free_run(3)
    generate(conf, ["a1", "a2"], cluster=3, client_port=client, cluster_port=routes)
    logs = [open(tmp / f"node-{i + 1}.log", "wb") for i in range(3)]
    nodes = [subprocess.Popen([nats_server_binary(), "-c", str(conf / f"node-{i + 1}.conf")],
                              stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    url = [f"nats://127.0.0.1:{client + i}" for i in range(3)]
    stack = Stack(tmp, nats_port=client, api_port=free_port())
    token = new_token()
    stack.auth = dev_auth("admin", {"admin": token})
    try:
        for i in range(3):
            wait_until(lambda i=i: port_open(client + i), f"cluster node {i + 1}",
                       proc=nodes[i])
        wait_until(lambda: asyncio.run(_jetstream_ready(url[0], str(conf / "apiserver.nk"))),
                   "JetStream meta leader", timeout=30)
        common = {"auth": stack.auth, "nats_nkey_seed_file": str(conf / "apiserver.nk"),
                  "limits": {"max_sessions_per_user": MAX_PER_USER}, "heartbeat": 0.5}
        stack.admin = "admin"
        stack.token_files["admin"] = tmp / "admin.token"
        stack.token_files["admin"].write_text(token + "\n")
        stack.start_apiserver({**common, "nats_url": url[0], "apiserver_id": "apia"})
        b_port = free_port()
        b_config = tmp / "apiserver-b.yaml"
        b_config.write_text(yaml.safe_dump({**common, "listen": f"127.0.0.1:{b_port}",
                                            "nats_url": url[1], "apiserver_id": "apib"}))
        b = stack._spawn("apiserver-b", [sys.executable, "-m", "rune.apiserver.main",
                                         "--config", str(b_config)])
        wait_until(lambda: port_open(b_port), "apiserver b", proc=b,
                   log=stack.logs / "apiserver-b.log")
        for agent, node in (("a1", 1), ("a2", 2)):
            stack.start_agent(agent, [{"name": "api", "replicas": 2, "command": SLEEP}],
                              {"nats": {"url": url[node],
                                        "nkey_seed_file": str(conf / f"agent-{agent}.nk")}})
        yield Apiservers(stack, token, {"a": stack.api_address, "b": f"127.0.0.1:{b_port}"},
                         url[0], conf)
    finally:
        stack.stop()
        for node in nodes:
            node.terminate()
            node.wait(timeout=10)
        for log in logs:
            log.close()


def open_exec(pair: Apiservers, via: str, argv: list[str]) -> tuple[object, object, str]:
    """A started exec through one apiserver: (channel, call, session id)."""
    channel = grpc.insecure_channel(pair.addresses[via])
    call = pb_grpc.ExecServiceStub(channel).StreamExec(
        iter([pb.ExecRequest(init=pb.ExecInit(target="api", command=argv))]),
        metadata=pair.metadata(), timeout=60)
    first = next(call)
    assert first.WhichOneof("msg") == "started"
    return channel, call, first.started.session_id


def test_a_session_through_a_is_listed_and_killed_through_b(pair):
    """Started through A, listed by B, killed through B: A's client hears who ended it, and
    A audits exactly one session.killed with the operator and the reason."""
    channel, call, session_id = open_exec(pair, "a", ["sleep", "60"])
    try:
        wait_until(lambda: session_id in {s.session_id for s in pair.list_sessions("b")},
                   "B lists A's session")
        began = time.monotonic()
        pair.kill("b", session_id, "drill")
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert time.monotonic() - began < 5
        assert "session ended by admin: drill" in info.value.details()
    finally:
        channel.close()
    wait_until(lambda: session_id not in {s.session_id for s in pair.list_sessions("b")},
               "B forgets the killed session")
    wait_until(lambda: any(e["event"] == "session.failed" and e.get("session_id") == session_id
                           for e in pair.audit()), "the killed session's failed event")
    killed = [e for e in pair.audit()
              if e["event"] == "session.killed" and e.get("session_id") == session_id]
    assert len(killed) == 1, killed
    assert (killed[0]["user"], killed[0]["reason"], killed[0]["session_user"]) == \
        ("admin", "drill", "admin")


def test_per_user_limit_holds_across_apiservers(pair):
    """max_sessions_per_user counts the sessions of both apiservers."""
    opened = [open_exec(pair, via, ["sleep", "60"]) for via in ("a", "b", "a", "b")]
    try:
        ids = {session_id for _, _, session_id in opened}
        wait_until(lambda: ids <= {s.session_id for s in pair.list_sessions("b")},
                   "B sees all four")
        with pytest.raises(grpc.RpcError) as info:
            open_exec(pair, "b", ["true"])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for channel, _, _ in opened:
            channel.close()
    wait_until(lambda: not pair.list_sessions("b"), "the sessions end")
    channel, call, _ = open_exec(pair, "b", ["true"])  # room again
    list(call)
    channel.close()
    wait_until(lambda: not pair.list_sessions("a"), "nothing left running")


def test_fanout_paces_itself_within_the_users_allowance(pair):
    """One session held through A leaves the user room for three more: a fan-out through B
    over all four instances that asks for more at once runs them within that room (as
    many as fit, the next as one ends), and every member succeeds instead of some being
    refused as too many sessions."""
    channel, _, session_id = open_exec(pair, "a", ["sleep", "60"])
    try:
        wait_until(lambda: session_id in {s.session_id for s in pair.list_sessions("b")},
                   "B sees A's session")
        with grpc.insecure_channel(pair.addresses["b"]) as channel_b:
            results = [r.result for r in pb_grpc.FanoutServiceStub(channel_b).StreamFanout(
                pb.FanoutRequest(target="api", all=True, max_parallel=1 << 30,
                                 command=["sh", "-c", "sleep 0.5"]),
                metadata=pair.metadata(), timeout=60) if r.WhichOneof("msg") == "result"]
    finally:
        channel.close()
    assert [(r.status, r.code) for r in results] == [("exited", 0)] * 4, results
    wait_until(lambda: not pair.list_sessions("b"), "nothing left running")


def test_a_killed_apiserver_mid_fanout_leaves_b_working(pair):
    """kill -9 of A during a fan-out: A's sessions stop counting and showing once its lease
    lapses, and a new run through B succeeds."""
    channel = grpc.insecure_channel(pair.addresses["a"])
    call = pb_grpc.FanoutServiceStub(channel).StreamFanout(
        pb.FanoutRequest(target="api", all=True, command=["sleep", "30"]),
        metadata=pair.metadata(), timeout=60)
    started = 0
    for response in call:
        started += response.WhichOneof("msg") == "started"
        if started == 4:
            break
    wait_until(lambda: len(pair.list_sessions("b")) == 4, "B sees A's fan-out")
    os.kill(pair.stack.procs["apiserver"].pid, signal.SIGKILL)
    pair.stack.procs["apiserver"].wait(timeout=10)
    channel.close()
    # Its sessions count (they may still run) until its lease lapses, then no more.
    wait_until(lambda: not pair.list_sessions("b"), "A's sessions forgotten", timeout=20)
    with grpc.insecure_channel(pair.addresses["b"]) as channel_b:
        results = [r.result for r in pb_grpc.FanoutServiceStub(channel_b).StreamFanout(
            pb.FanoutRequest(target="api", all=True, command=["echo", "ok"]),
            metadata=pair.metadata(), timeout=60) if r.WhichOneof("msg") == "result"]
    assert [(r.status, r.code) for r in results] == [("exited", 0)] * 4
    # The CLI given both addresses goes on to B when A refuses the connection.
    both = f"{pair.addresses['a']},{pair.addresses['b']}"
    result = subprocess.run(
        [sys.executable, "-m", "rune.cli.main", "exec", "--api-server", both, "api", "echo",
         "via b"], capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "RUNE_TOKEN_FILE": str(pair.stack.token_files["admin"]),
             "RUNE_CONFIG": str(pair.stack.state_dir / "no-config.yaml"), "RUNE_MUX": "off"})
    assert (result.returncode, result.stdout) == (0, b"via b\n"), result.stderr
