"""Attacks on the one session core, against a real secured stack (nkeys broker, tokens, RBAC).

Each case sends the hostile request and asserts the safe outcome, then that the stack
is still healthy: a normal exec works and its events reach the audit stream.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from rune.cli.devstack import Stack, free_port, wait_until

from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc
from rune.subjects import Subjects
from tests.conftest import ROOT
from tests.security.grpc_flood import CHUNK, RawBidi, grpc_frame
from tests.test_audit_e2e import stream_events

SLEEP = ["sh", "-c", "exec sleep 2147483647"]
SERVICES = [
    {"name": "api", "namespace": "default", "replicas": 3, "command": SLEEP},
    {"name": "db", "namespace": "prod", "replicas": 1, "command": SLEEP},
]
MAX_PER_USER = 8
FLOOD = 1_000_000  # resize messages on one session (the figure)
FLOOD_SECONDS = 400.0  # bound on the whole flood call; ~70 s on an idle 2-core machine


def secure_stack(tmp_path_factory) -> Iterator[Stack]:
    """The secured stack: nkeys broker, tokens (admin, dev), one agent with SERVICES."""
    stack = Stack(tmp_path_factory.mktemp("core-secure"), nats_port=free_port(),
                  api_port=free_port())
    stack.secure(["a1"])
    try:
        stack.start_nats()
        stack.start_apiserver({"limits": {"max_sessions_per_user": MAX_PER_USER},
                               "heartbeat": 0.5})
        stack.start_agent("a1", SERVICES, wait_running=4)
    except BaseException:
        stack.stop()
        raise
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    yield from secure_stack(tmp_path_factory)


def audit(stack: Stack, subject: str = "rune.audit.>") -> list[dict]:
    return stream_events(stack.nats_url, subject, nkeys_seed=stack.nkey("audit-reader"),
                         inbox_prefix=Subjects().inbox("audit"))


def wait_audit(stack: Stack, pred, what: str, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in audit(stack) if pred(e)]
        if found or time.monotonic() > deadline:
            assert found, f"no audit event: {what}"
            return found
        time.sleep(0.1)


def cli(stack: Stack, *args: str, user: str = "admin", timeout: float = 60,
        stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUNE_CONFIG": str(stack.state_dir / "no-config.yaml"),
           "RUNE_TOKEN_FILE": str(stack.token_files[user])}
    head = 2 if args[0] == "sessions" else 1  # the command (and subcommand) come first
    argv = [sys.executable, "-m", "rune.cli.main", *args[:head], "--api-server",
            stack.api_address, *args[head:]]
    return subprocess.run(argv, capture_output=True, timeout=timeout, env=env, cwd=ROOT,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


def agent_processes(stack: Stack) -> int:
    """How many rune-agent processes of this stack exist (a forked copy would show here)."""
    marker = str(stack.state_dir).encode()
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"rune.agent.main" in cmdline and marker in cmdline:
            count += 1
    return count


def assert_healthy(stack: Stack) -> None:
    """A normal exec works and its started/ended events reach the audit stream."""
    mark = f"healthy-{uuid.uuid4().hex[:8]}"
    result = cli(stack, "exec", "api", "echo", mark)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{mark}\n".encode()
    events = wait_audit(stack, lambda e: mark in e.get("argv", []) and
                        e["event"] == "session.ended", f"ended of {mark}", timeout=5)
    assert events[0]["exit_code"] == 0


async def raw_exec(stack: Stack, requests: list[pb.ExecRequest], read: int = 100
                   ) -> grpc.aio.AioRpcError | None:
    async with grpc.aio.insecure_channel(stack.api_address) as channel:
        call = pb_grpc.ExecServiceStub(channel).StreamExec(
            metadata=(("authorization", f"Bearer {stack.admin_token}"),))
        for request in requests:
            await call.write(request)
        try:
            for _ in range(read):
                if await call.read() is grpc.aio.EOF:
                    return None
        except grpc.aio.AioRpcError as exc:
            return exc
    return None


def init(**fields) -> pb.ExecRequest:
    fields.setdefault("target", "api")
    fields.setdefault("command", ["true"])
    return pb.ExecRequest(init=pb.ExecInit(**fields))


# --- fan-out members are sessions like any other -----------------------------------------

def test_fanout_members_are_audited_started_and_ended(secure):
    """--instances (one) and --all write session.started and session.ended per member."""
    mark = f"fan-{uuid.uuid4().hex[:8]}"
    one = cli(secure, "exec", "--instances", "api-instance-a1-0", "api", "echo", mark)
    assert one.returncode == 0, one.stderr
    every = cli(secure, "exec", "--all", "api", "echo", mark)
    assert every.returncode == 0, every.stderr
    ended = wait_audit(secure, lambda e: mark in e.get("argv", []) and
                       e["event"] == "session.ended", "ended", timeout=10)
    deadline = time.monotonic() + 10
    while len(ended) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
        ended = [e for e in audit(secure) if mark in e.get("argv", [])
                 and e["event"] == "session.ended"]
    started = [e for e in audit(secure) if mark in e.get("argv", [])
               and e["event"] == "session.started"]
    assert len(started) == 4 and len(ended) == 4
    assert sorted(e["instance"] for e in ended) == sorted(
        ["api-instance-a1-0", "api-instance-a1-0", "api-instance-a1-1", "api-instance-a1-2"])
    fanouts = {e["fanout_id"] for e in ended}
    assert len(fanouts) == 2 and all(e["kind"] == "fanout" for e in ended)


def test_fanout_denied_by_policy_is_audited(secure):
    """A fan-out refused by RBAC (dev in prod) or policy writes session.denied."""
    mark = f"deny-{uuid.uuid4().hex[:8]}"
    result = cli(secure, "exec", "-n", "prod", "--all", "db", "echo", mark, user="dev")
    assert result.returncode == 255
    assert b"permission denied" in result.stderr
    denied = wait_audit(secure, lambda e: mark in e.get("argv", []), "denied")
    assert [e["event"] for e in denied] == ["session.denied"]
    assert denied[0]["user"] == "dev" and denied[0]["fanout_id"]
    assert_healthy(secure)


def test_kill_ends_a_fanout_member(secure):
    """`rune sessions kill` ends a running fan-out member within 2 s; the others go on."""
    mark = f"kill-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "RUNE_CONFIG": str(secure.state_dir / "no-config.yaml"),
           "RUNE_TOKEN_FILE": str(secure.token_files["admin"])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rune.cli.main", "exec", "--api-server", secure.api_address,
         "--all", "api", "sh", "-c", f"sleep 4; echo {mark}"], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        started = wait_audit(secure, lambda e: any(mark in a for a in e.get("argv", []))
                             and e["event"] == "session.started", "started")
        wait_until(lambda: len([e for e in audit(secure) if e["event"] == "session.started"
                                and any(mark in a for a in e.get("argv", []))]) == 3,
                   "three members started")
        victim = started[0]
        killed = cli(secure, "sessions", "kill", victim["session_id"], "--reason", "drill")
        assert killed.returncode == 0, killed.stderr
        began = time.monotonic()  # the kill is acknowledged: the member must end now
        failed = wait_audit(secure, lambda e: e.get("session_id") == victim["session_id"]
                            and e["event"] == "session.failed", "member failed", timeout=5)
        assert time.monotonic() - began < 2.0
        assert failed[0]["code"] == "killed" and "drill" in failed[0]["reason"]
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert out.count(mark.encode()) == 2  # the two other members ran to their end
    assert b"killed" in out + err


async def test_fanout_members_count_against_the_user_limit(secure):
    """Concurrent fan-outs of one user never run more members at once than
    max_sessions_per_user: each member either runs within the allowance (a fan-out paces
    itself in what was left when it began) or is refused as too many sessions."""
    metadata = (("authorization", f"Bearer {secure.admin_token}"),)

    async def fanout() -> list[pb.FanoutResponse]:
        async with grpc.aio.insecure_channel(secure.api_address) as channel:
            call = pb_grpc.FanoutServiceStub(channel).StreamFanout(
                pb.FanoutRequest(target="*", all=True, command=["sleep", "3"]),
                metadata=metadata)
            return [r async for r in call]

    most = 0

    async def watch(done: asyncio.Event) -> None:
        nonlocal most
        async with grpc.aio.insecure_channel(secure.api_address) as channel:
            while not done.is_set():
                reply = await pb_grpc.ExecServiceStub(channel).ListSessions(
                    pb.ListSessionsRequest(active_only=True, all_namespaces=True),
                    metadata=metadata)
                most = max(most, sum(s.user == "admin" for s in reply.sessions))
                await asyncio.sleep(0.02)

    done = asyncio.Event()
    watcher = asyncio.create_task(watch(done))
    try:
        runs = await asyncio.gather(*(fanout() for _ in range(5)))  # 5 x 3 = 15 > 8
    finally:
        done.set()
        await watcher
    results = [r.result for run in runs for r in run if r.WhichOneof("msg") == "result"]
    assert len(results) == 15
    exhausted = [r for r in results if r.error.code == "resource_exhausted"]
    exited = [r for r in results if r.status == "exited" and r.code == 0]
    assert 0 < most <= MAX_PER_USER
    assert len(exited) >= MAX_PER_USER and len(exited) + len(exhausted) == 15
    await asyncio.to_thread(assert_healthy, secure)


@pytest.mark.parametrize("request_fields, field", [
    ({"command": ["echo", "a\0b"]}, "argv"),
    ({"env": {"A=B": "x"}}, "env"),
    ({"workdir": "tmp"}, "workdir"),
    ({"command": ["echo", "x" * (2 * 1024 * 1024)]}, "argv"),
])
async def test_fanout_requests_are_bounded_like_exec(secure, request_fields, field):
    """Raw gRPC fan-out with a NUL, '=' in an env key, a relative workdir, an 8 MiB argv."""
    request = pb.FanoutRequest(target="api", all=True, **{"command": ["true"],
                                                          **request_fields})
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(secure.api_address, options=options) as channel:
        call = pb_grpc.FanoutServiceStub(channel).StreamFanout(
            request, metadata=(("authorization", f"Bearer {secure.admin_token}"),))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    await asyncio.to_thread(assert_healthy, secure)


# --- bounds at the boundary ------------------------------------------------------------

def test_namespace_with_a_newline_does_not_stop_the_audit(secure):
    """-n $'default\\n' is INVALID_ARGUMENT, and the next exec is audited within 2 s."""
    result = cli(secure, "exec", "-n", "default\n", "api", "true", user="dev")
    assert result.returncode == 255
    assert b"namespace" in result.stderr
    mark = f"after-{uuid.uuid4().hex[:8]}"
    began = time.monotonic()
    assert cli(secure, "exec", "api", "echo", mark).returncode == 0
    wait_audit(secure, lambda e: mark in e.get("argv", []) and e["event"] == "session.ended",
               "exec after a bad namespace", timeout=2.0 + (time.monotonic() - began))


@pytest.mark.parametrize("first, field", [
    (init(tty=True, width=70000, height=24), "width"),
    (init(tty=True, width=80, height=2**32 - 1), "height"),
    (init(timeout_seconds=float("nan")), "timeout"),
    (init(timeout_seconds=float("inf")), "timeout"),
    (init(namespace="default\n"), "namespace"),
    (init(target="api-instance-a1-0\n"), "target"),
    (init(target="api.*"), "target"),
    (init(target=">"), "target"),
])
async def test_out_of_bounds_init_is_refused_and_the_agent_lives(secure, first, field):
    """Each out-of-bounds init is INVALID_ARGUMENT; no agent copy is left; next exec works."""
    before = agent_processes(secure)
    error = await raw_exec(secure, [first])
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert field in error.details()
    assert agent_processes(secure) == before
    await asyncio.to_thread(assert_healthy, secure)


@pytest.mark.parametrize("number", [0, 99, -1])
async def test_out_of_range_signal_is_refused(secure, number):
    """A signal 0, 99 or -1 ends the stream with INVALID_ARGUMENT; the next exec works."""
    error = await raw_exec(secure, [init(command=["sleep", "30"]),
                                    pb.ExecRequest(signal=pb.Signal(number=number))])
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "signal" in error.details()
    await asyncio.to_thread(assert_healthy, secure)


async def test_out_of_range_resize_is_refused(secure):
    """A resize to 70000 columns ends the stream with INVALID_ARGUMENT."""
    error = await raw_exec(secure, [init(command=["sleep", "30"], tty=True, width=80,
                                         height=24),
                                    pb.ExecRequest(resize=pb.Resize(width=70000, height=1))])
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "width" in error.details()
    await asyncio.to_thread(assert_healthy, secure)


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class PeakRss(threading.Thread):
    """The highest RSS of some processes while it runs, sampled every 0.2 s."""

    def __init__(self, *pids: int) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = [rss_kib(pid) for pid in pids]
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.peak = [max(p, rss_kib(pid)) for p, pid in zip(self.peak, self.pids, strict=True)]


@pytest.mark.timeout(FLOOD_SECONDS + 120)
def test_a_resize_flood_grows_no_memory(secure):
    """1,000,000 resizes on one open session: apiserver and agent RSS stay within +20 MiB,
    and the last size wins. The requests are encoded once and written in large HTTP/2
    frames (grpc_flood.py), so the sender is cheap and the apiserver is what is measured;
    every one of them is sent, within FLOOD_SECONDS."""
    api_pid = secure.procs["apiserver"].pid
    agent_pid = secure.procs["agent-a1"].pid
    before = rss_kib(api_pid), rss_kib(agent_pid)
    one = grpc_frame(pb.ExecRequest(resize=pb.Resize(width=100, height=40))
                     .SerializeToString())
    per_chunk = CHUNK // len(one)

    def chunks():
        yield grpc_frame(init(command=["sh", "-c", "read x; stty size"], tty=True, width=80,
                              height=24).SerializeToString())
        left = FLOOD
        while left:
            count = min(per_chunk, left)
            left -= count
            yield one * count
        yield grpc_frame(pb.ExecRequest(resize=pb.Resize(width=123, height=45))
                         .SerializeToString())
        yield grpc_frame(pb.ExecRequest(stdin=b"go\n").SerializeToString())

    peak = PeakRss(api_pid, agent_pid)
    peak.start()
    began = time.monotonic()
    call = RawBidi(secure.api_address, "/rune.v1.ExecService/StreamExec",
                   (("authorization", f"Bearer {secure.admin_token}"),), FLOOD_SECONDS)
    output = b""
    try:
        call.send(chunks())  # all of them: flow control paces it, the deadline bounds it
        for message in call.messages():
            response = pb.ExecResponse.FromString(message)
            if response.WhichOneof("msg") == "stdout":
                output += response.stdout
            elif response.WhichOneof("msg") == "exit":
                call.close_send()
    finally:
        call.close()
        peak.done.set()
        peak.join()
    took = time.monotonic() - began
    after = rss_kib(api_pid), rss_kib(agent_pid)
    print(f"resize flood: {FLOOD} messages in {took:.1f}s ({FLOOD / took:.0f}/s); RSS KiB "
          f"apiserver {before[0]} -> {after[0]} (peak {peak.peak[0]}), agent {before[1]} -> "
          f"{after[1]} (peak {peak.peak[1]})")
    assert call.trailers.get("grpc-status") == "0", call.trailers
    assert re.search(rb"45 123", output), output  # the last size won
    assert after[0] - before[0] < 20 * 1024, (before, after)
    assert after[1] - before[1] < 20 * 1024, (before, after)
    assert_healthy(secure)


# --- recording and display on the secured stack -----------------------------------------

def test_tty_session_is_recorded_and_replays_on_the_secured_stack(secure):
    """`rune exec -t api echo REC` is listed by `sessions list` and replays."""
    mark = f"REC-{uuid.uuid4().hex[:8]}"
    result = cli(secure, "exec", "-t", "api", "echo", mark)
    assert result.returncode == 0, result.stderr
    session_id = None
    deadline = time.monotonic() + 10
    while session_id is None and time.monotonic() < deadline:
        listing = cli(secure, "sessions", "list")
        for line in listing.stdout.decode().splitlines():
            words = line.split()
            if mark in line and words[1] == "recorded":
                session_id = words[0]
        time.sleep(0.2)
    assert session_id, listing.stdout
    replay = cli(secure, "sessions", "replay", session_id, "--cast")
    assert replay.returncode == 0, replay.stderr
    assert mark.encode() in replay.stdout
    log = (secure.logs / "apiserver.log").read_text()
    assert "permissions violation" not in log.lower()


def test_escapes_in_argv_are_shown_escaped(secure):
    """An argv with a newline and a terminal escape cannot forge rows in logs and tables."""
    evil = "x\n2026-01-01 session.ended user=root\x1b[2J"
    assert cli(secure, "exec", "api", "echo", evil).returncode == 0
    wait_audit(secure, lambda e: evil in e.get("argv", []) and e["event"] == "session.ended",
               "ended of the escaped argv")
    log = (secure.logs / "apiserver.log").read_text()
    assert "\x1b[2J" not in log
    assert "x\\n2026-01-01 session.ended user=root\\x1b[2J" in log
    shown = cli(secure, "audit", "--since", "1m")
    assert shown.returncode == 0, shown.stderr
    assert b"\x1b[2J" not in shown.stdout
    assert b"x\\n2026-01-01" in shown.stdout
    assert_healthy(secure)
