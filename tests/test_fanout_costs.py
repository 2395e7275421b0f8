"""What a fan-out member no longer costs, and the controls it keeps, against the real parts:
every member audited (started and ended, all fields), listed, killable on its own and idle-
timed by the one sweep; the audit publisher's pipelined rounds; the session board's
gathered writes and indexed counts; the members' log lines at debug, the fan-out's at info."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from types import SimpleNamespace

import grpc
import nats
import pytest
from conftest import Rune
from multi_agent import start_fleet
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from rune.apiserver import peers
from rune.apiserver.oversight import Oversight
from rune.apiserver.peers import SessionBoard
from rune.cli.devstack import Stack, free_port, wait_until

from rune import audit as schema
from rune import frames
from rune.audit import BufferedPublisher, event_id, iso_time
from rune.models import InstanceInfo
from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc
from rune.subjects import Subjects
from tests.test_audit_e2e import stream_events

AGENTS, REPLICAS = 4, 15
IDLE = 3.0  # seconds: the idle sweep ends the silent members of the kill test
MEMBER_FIELDS = {"version", "event", "id", "time", "source", "user", "groups", "namespace",
                 "target", "argv", "tty", "workdir", "env_keys", "session_id", "instance",
                 "service", "agent", "host", "runner", "kind", "fanout_id"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("costs"), nats_port=free_port(),
                  api_port=free_port())
    try:
        stack.start_nats()
        stack.start_apiserver({"idle_timeout": IDLE})
        start_fleet(stack, AGENTS, REPLICAS, service="cheap", id_prefix="c", processes=1)
        yield Rune(stack)
    finally:
        stack.stop()


def _members(stack: Stack, fanout_id: str) -> list[dict]:
    return [e for e in stream_events(stack.nats_url) if e.get("fanout_id") == fanout_id]


def _fanout_ids(stack: Stack) -> list[str]:
    log = (stack.logs / "apiserver.log").read_text()
    return re.findall(r"fan-out ([0-9a-f]{32}) start:", log)


def test_every_member_is_audited_with_every_field(fleet):
    """--all true over 60 instances: one started and one ended per member, each with the
    fields of any session; the log has the fan-out's start and end lines, no member lines."""
    result = fleet("exec", "cheap", "--all", "true", timeout=240)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    fanout_id = _fanout_ids(fleet.stack)[-1]
    total = AGENTS * REPLICAS
    wait_until(lambda: len(_members(fleet.stack, fanout_id)) >= 2 * total,
               "every member's events stored", timeout=30)
    events = _members(fleet.stack, fanout_id)
    expected = {f"cheap-instance-c{a:03d}-{i}" for a in range(AGENTS) for i in range(REPLICAS)}
    for kind in (schema.STARTED, schema.ENDED):
        of_kind = [e for e in events if e["event"] == kind]
        assert sorted(e["instance"] for e in of_kind) == sorted(expected), kind
        for event in of_kind:
            assert MEMBER_FIELDS <= set(event), MEMBER_FIELDS - set(event)
            assert event["kind"] == "fanout" and event["argv"] == ["true"]
            assert re.fullmatch(r"[0-9a-f]{32}", event["id"])
    ended = [e for e in events if e["event"] == schema.ENDED]
    assert {(e["exit_code"], e["signal"]) for e in ended} == {(0, 0)}
    assert len({e["id"] for e in events}) == len(events) == 2 * total
    started_ids = {e["session_id"] for e in events if e["event"] == schema.STARTED}
    assert started_ids == {e["session_id"] for e in ended}
    log = (fleet.stack.logs / "apiserver.log").read_text()
    assert re.search(rf"fan-out {fanout_id} end: instances={total} reported={total} "
                     rf"took=[0-9.]+s exited:0={total}", log)
    assert not re.search(rf"session\.(started|ended) .*fanout_id={fanout_id}", log)


def test_members_stdin_is_closed_by_the_agent_without_a_frame(fleet):
    """A member's stdin is closed by its agent as it starts (ExecOpen.stdin false), so `cat`
    reads EOF at once everywhere and no STDIN_EOF frame crosses the broker for a member."""
    seen: list[int] = []

    async def watch_and_run() -> subprocess.CompletedProcess:
        nc = await nats.connect(fleet.stack.nats_url)
        try:
            async def frame(msg: object) -> None:
                try:
                    seen.append(frames.decode(msg.data)[0])
                except frames.MalformedFrame:
                    seen.append(-1)

            await nc.subscribe("rune.in.>", cb=frame)
            await nc.flush()
            result = await asyncio.to_thread(fleet, "exec", "cheap", "--all", "cat",
                                             timeout=240)
            await nc.flush()
            return result
        finally:
            await nc.close()

    result = asyncio.run(watch_and_run())
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    fanout_id = _fanout_ids(fleet.stack)[-1]
    log = (fleet.stack.logs / "apiserver.log").read_text()
    total = AGENTS * REPLICAS
    assert re.search(rf"fan-out {fanout_id} end: instances={total} reported={total} "
                     rf"took=[0-9.]+s exited:0={total}", log)
    assert seen, "the watch saw no session input at all (acks and credit are input too)"
    assert frames.STDIN_EOF not in seen and -1 not in seen
    # The next run is healthy, and a session of its own still gets stdin and its EOF.
    assert fleet("exec", "cheap-instance-c000-0", "cat", input=b"still here").stdout == \
        b"still here"


def test_each_request_opens_with_its_own_command_env_and_instance(fleet):
    """The ExecOpen validated once per request: every member still runs its own instance,
    and the next request (another argv, another env, a single exec between) is not served
    the previous one's."""
    script = 'echo "$RUNE_INSTANCE $WHICH $0"'
    ids = sorted(f"cheap-instance-c{a:03d}-{r}" for a in range(AGENTS) for r in range(REPLICAS))
    for which in ("first", "second"):
        result = fleet("exec", "cheap", "--all", "--env", f"WHICH={which}", "--", "sh", "-c",
                       script, which, timeout=240)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        lines = sorted(line.split(" | ", 1)[1] for line in result.stdout.decode().splitlines())
        assert lines == sorted(f"{i} {which} {which}" for i in ids)
        single = fleet("exec", "--env", "WHICH=alone", "cheap-instance-c001-2", "--", "sh",
                       "-c", script, "alone")
        assert single.stdout.decode() == "cheap-instance-c001-2 alone alone\n"


def test_settled_heap_still_collects_cycles():
    """settle_heap (run by the apiserver and each agent once started): the start-up heap is
    frozen and young collections are rarer, yet a cycle made later is still collected."""
    code = ("import gc, weakref\n"
            "from rune.runtime import settle_heap, YOUNG_COLLECTION_EVERY\n"
            "settle_heap()\n"
            "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
            "assert gc.get_threshold()[0] == YOUNG_COLLECTION_EVERY\n"
            "class Node: pass\n"
            "a, b = Node(), Node(); a.peer, b.peer = b, a\n"
            "gone = weakref.ref(a); del a, b\n"
            "kept = [[] for _ in range(3 * YOUNG_COLLECTION_EVERY)]\n"
            "assert gone() is None, 'a cycle outlived young collections'\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.stdout == b"ok\n", result.stderr.decode()


def _sessions(stack: Stack) -> list[pb.SessionInfo]:
    with grpc.insecure_channel(stack.api_address) as channel:
        reply = pb_grpc.ExecServiceStub(channel).ListSessions(
            pb.ListSessionsRequest(all_namespaces=True), timeout=30)
    return [s for s in reply.sessions if s.state == "active"]


def test_members_are_listed_and_killed_one_by_one(fleet):
    """A long fan-out's members are listed; killing one ends only it (killed, 137), audited
    as killed; the others run on until the idle sweep ends them (nothing moves)."""
    cli = subprocess.Popen(fleet.argv("exec", "cheap", "--all", "--max-parallel", "8",
                                      "--json", "sleep", "30"),
                           env=fleet.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: len(_sessions(fleet.stack)) == 8, "eight members listed")
        victim = max(_sessions(fleet.stack), key=lambda s: s.started)  # the least idle
        assert victim.fanout_id
        with grpc.insecure_channel(fleet.stack.api_address) as channel:
            reply = pb_grpc.ExecServiceStub(channel).KillSession(
                pb.KillSessionRequest(session_id=victim.session_id, reason="test"),
                timeout=30)
        assert reply.killed
        out, _ = cli.communicate(timeout=200)
    finally:
        if cli.poll() is None:
            cli.kill()
    results = {r["instance"]: r for r in map(json.loads, out.decode().splitlines())
               if r["type"] == "result"}
    assert len(results) == AGENTS * REPLICAS
    killed = [r for r in results.values() if r["status"] == "killed"]
    assert [r["instance"] for r in killed] == [victim.instance_id]
    assert killed[0]["exit_code"] == 137
    # The idle timeout (`sleep` says nothing) ended every other member.
    rest = {r["status"] for i, r in results.items() if i != victim.instance_id}
    assert rest == {"failed"}, rest
    assert all("session idle" in r["error"] for i, r in results.items()
               if i != victim.instance_id)
    events = stream_events(fleet.stack.nats_url)
    assert any(e["event"] == schema.KILLED and e["session_id"] == victim.session_id
               for e in events)
    assert _sessions(fleet.stack) == []
    assert fleet("exec", "cheap", "--all", "true", timeout=240).returncode == 0  # healthy


def test_iso_time_matches_datetime_and_ids_are_unique():
    """The once-a-second time text is the datetime one to the millisecond; ids are 32 hex
    digits and never repeat."""
    for ts in (0.0, 0.0005, 1764637985.123, 1764637985.9996, time.time()):
        expected = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
        assert iso_time(ts) == expected.replace("+00:00", "Z")
    ids = {event_id() for _ in range(10000)}
    assert len(ids) == 10000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("costs-nats"), nats_port=free_port(),
                  api_port=free_port())
    stack.start_nats()
    yield stack.nats_url
    stack.stop()


async def test_a_burst_is_stored_whole_and_in_order(nats_url):
    """Two thousand events submitted at once (a big fan-out's members): every one stored,
    in the order submitted, in rounds rather than one round trip each."""
    subjects = Subjects("burst")
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(StreamConfig(name="BURST_AUDIT",
                                                 subjects=[subjects.audit_all()]))
    publisher = BufferedPublisher(nc, "test audit")
    await publisher.start()
    try:
        for i in range(2000):
            publisher.submit(subjects.audit("default", schema.ENDED), b"%d" % i)
        assert await publisher.flush(30)
        assert publisher.published == 2000 and publisher.dropped == 0
        sub = await nc.jetstream().pull_subscribe(
            subjects.audit_all(), stream="BURST_AUDIT",
            config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        got = []
        while len(got) < 2000:
            got += [int(m.data) for m in await sub.fetch(500, timeout=5)]
        assert got == list(range(2000))
    finally:
        await publisher.stop()
        await nc.close()


def _record(session_id: str, user: str = "ann", agent: str = "h1") -> SimpleNamespace:
    info = InstanceInfo(namespace="default", service="api", instance_id="api-instance-h1-0",
                        agent=agent, host="host1", runner="process", state="running")
    return SimpleNamespace(id=session_id, user=user, instance=info, argv=["sleep", "9"],
                           tty=False, started=time.time(), kind="fanout", fanout_id="f",
                           on_agent=True)


async def test_board_writes_only_sessions_that_outlive_a_write(nats_url):
    """A session gone before the board's next write is never written; one that lives is
    written, seen by another apiserver, counted there per user and agent, then purged."""
    nc_a, nc_b = await nats.connect(nats_url), await nats.connect(nats_url)
    a = SessionBoard(nc_a, Subjects("board"), "apia", lambda *_: False)
    b = SessionBoard(nc_b, Subjects("board"), "apib", lambda *_: False)
    await a.start()
    await b.start()
    seen: list[str] = []

    async def heard(msg) -> None:
        seen.append(msg.subject)

    await nc_b.subscribe(f"$KV.{Subjects('board').sessions_bucket}.s.>", cb=heard)
    try:
        brief = _record("brief")
        a.added(brief)
        a.removed(brief)
        lasting = [_record(f"keep{i}") for i in range(3)]
        for record in lasting:
            a.added(record)
        await _until(lambda: b.counts("ann", "h1") == (3, 3))
        assert b.find("keep0")["user"] == "ann"
        assert not any(s.endswith(".brief") for s in seen), seen
        assert b.find("brief") is None
        for record in lasting:
            a.removed(record)
        await _until(lambda: b.counts("ann", "h1") == (0, 0))
        assert b.remote() == [] and b._counts == {}
    finally:
        await a.stop()
        await b.stop()
        await nc_a.close()
        await nc_b.close()


async def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(peers.WRITE_EVERY / 2)


def test_member_lines_log_at_debug_and_failures_at_info(caplog):
    """A fan-out member's started and ended events are published like any session's but
    logged at debug; a failed member, and a plain session, log at info."""
    published: list[dict] = []
    oversight = Oversight(auditor=SimpleNamespace(emit=published.append))
    caplog.set_level(logging.DEBUG, logger="rune.apiserver.sessions")
    for event, fanout_id in ((schema.STARTED, "f1"), (schema.ENDED, "f1"),
                             (schema.FAILED, "f1"), (schema.STARTED, "")):
        fields = {"fanout_id": fanout_id} if fanout_id else {}
        oversight._emit(schema.make_event(event, user="ann", **fields))
    assert [e["event"] for e in published] == [schema.STARTED, schema.ENDED, schema.FAILED,
                                               schema.STARTED]
    levels = [(r.getMessage().split()[0], r.levelno) for r in caplog.records]
    assert levels == [(schema.STARTED, logging.DEBUG), (schema.ENDED, logging.DEBUG),
                      (schema.FAILED, logging.INFO), (schema.STARTED, logging.INFO)]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
