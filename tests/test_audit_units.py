"""Audit schema and the non-blocking publisher, against a real nats-server."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest
from nats.js.api import StreamConfig
from rune.apiserver.audit import Auditor, AuditSettings, ensure_stream, subject_token
from rune.cli.audit_cmd import parse_since, render, result_text, row
from rune.cli.devstack import Stack, free_port

from rune import audit as schema
from rune.audit import BufferedPublisher
from rune.subjects import Subjects


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("nats"), nats_port=free_port(), api_port=free_port())
    stack.start_nats()
    yield stack.nats_url
    stack.stop()


async def _wait(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_make_event_stamps_version_id_and_time():
    """Every event carries the schema version, a unique id and a UTC time."""
    a = schema.make_event(schema.STARTED, user="u")
    b = schema.make_event(schema.STARTED, user="u")
    assert a["version"] == 1 and a["event"] == "session.started" and a["user"] == "u"
    assert a["id"] != b["id"] and a["time"].endswith("Z")
    assert json.loads(schema.encode(a)) == a
    with pytest.raises(ValueError):
        schema.make_event("session.exploded")


def test_subject_token_guards_wildcards():
    """Namespaces that are not valid subject tokens never reach a subject."""
    assert subject_token("prod") == "prod"
    for bad in ("a.b", "*", ">", "", "x y"):
        assert subject_token(bad) == "_invalid"


async def test_stream_is_created_idempotently_with_retention(nats_url):
    """Starting twice keeps one stream; a changed retention is applied to it."""
    subjects = Subjects("idem")
    nc = await nats.connect(nats_url)
    try:
        for max_age in (3600.0, 3600.0, 7200.0):
            await ensure_stream(nc, subjects.audit_stream, [subjects.audit_all()], max_age,
                                1 << 20, "test")
        info = await nc.jetstream().stream_info(subjects.audit_stream)
        assert info.config.max_age == 7200.0 and info.config.max_bytes == 1 << 20
        assert info.config.subjects == ["idem.audit.>"]
    finally:
        await nc.close()


async def test_events_wait_for_a_missing_stream_and_losses_are_counted(nats_url):
    """With no stream, submit never waits; events are retried, the oldest dropped past the
    bound and counted, and the rest stored once the stream exists."""
    subjects = Subjects("buf")
    nc = await nats.connect(nats_url)
    publisher = BufferedPublisher(nc, "test audit", limit=3, ack_timeout=0.2)
    await publisher.start()
    try:
        for i in range(5):
            publisher.submit(subjects.audit("default", schema.ENDED), f"{i}".encode())
        assert publisher.dropped == 2 and publisher.buffered == 3
        await _wait(lambda: publisher.failures >= 1)
        assert publisher.published == 0
        await nc.jetstream().add_stream(StreamConfig(name="BUF_AUDIT",
                                                     subjects=[subjects.audit_all()]))
        assert await publisher.flush(15)
        assert publisher.published == 3 and publisher.buffered == 0
        sub = await nc.jetstream().pull_subscribe(subjects.audit_all(), stream="BUF_AUDIT")
        msgs = await sub.fetch(10, timeout=2)
        assert [m.data for m in msgs] == [b"2", b"3", b"4"]
    finally:
        await publisher.stop()
        await nc.close()


async def test_auditor_query_filters_user_namespace_and_time(nats_url):
    """Auditor.query reads back events by namespace (subject) and user, in order."""
    subjects = Subjects("q")
    nc = await nats.connect(nats_url)
    auditor = Auditor(nc, subjects, AuditSettings(max_age=60))
    await auditor.start()
    try:
        for user, ns in (("ann", "default"), ("bob", "default"), ("ann", "prod")):
            auditor.emit(schema.make_event(schema.DENIED, user=user, namespace=ns))
        assert await auditor.publisher.flush(10)
        ann = [e async for e in auditor.query(user="ann")]
        assert [e["namespace"] for e in ann] == ["default", "prod"]
        default = [e async for e in auditor.query(namespace="default")]
        assert [e["user"] for e in default] == ["ann", "bob"]
        future = [e async for e in auditor.query(since=4102444800.0)]  # year 2100
        assert future == []
    finally:
        await auditor.stop()
        await nc.close()


def test_cli_table_rows_and_durations():
    """The audit table shows a readable result per event; --since accepts days."""
    ended = {"event": "session.ended", "time": "2026-01-02T03:04:05.678Z", "user": "u",
             "namespace": "n", "instance": "i", "argv": ["sh", "-c", "a b"], "exit_code": 0,
             "signal": 0}
    assert row(ended) == ("2026-01-02 03:04:05", "ended", "u", "n", "i", "exit 0",
                          'sh -c "a b"')
    assert result_text({**ended, "signal": 9}) == "signal 9"
    assert result_text({"event": "session.denied", "code": "not_found", "reason": "x"}) == \
        "not_found: x"
    lines = render([("A", "BB", "C"), ("long", "x", "tail")])
    assert lines == ["A     BB  C", "long  x   tail"]
    assert parse_since("2d") == 172800 and parse_since("90s") == 90
    with pytest.raises(ValueError):
        parse_since("soon")


def test_session_log_lines_are_structured_json():
    """With --log-format json each session line is one JSON object with the event's fields."""
    import io
    import logging
    from types import SimpleNamespace

    from rune.apiserver.auth import Identity
    from rune.apiserver.oversight import Oversight

    from rune.errors import NotFound
    from rune.runtime import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("rune.apiserver.sessions")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        init = SimpleNamespace(namespace="prod", target="db", argv=["psql"], tty=False,
                               workdir="", env={"PGPASSWORD": "pw"})
        Oversight().denied(Identity("ann", ("ops",)), init, NotFound("no such db"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["msg"].startswith("session.denied user=ann namespace=prod target=db")
    assert entry["event"] == "session.denied" and entry["groups"] == ["ops"]
    assert entry["code"] == "not_found" and entry["env_keys"] == ["PGPASSWORD"]
    assert "pw" not in lines[0].replace("PGPASSWORD", "")


def test_oversight_event_sequences_per_outcome():
    """Open failure → one failed (stage open); exit → started+ended; else started+failed."""
    from types import SimpleNamespace

    from rune.apiserver.auth import Identity
    from rune.apiserver.metrics import ApiMetrics
    from rune.apiserver.oversight import Oversight
    from rune.apiserver.session import SessionRecord

    from rune.errors import Unavailable
    from rune.models import InstanceInfo

    class Collect:
        def __init__(self) -> None:
            self.events: list[dict] = []

        def emit(self, event: dict) -> None:
            self.events.append(event)

    instance = InstanceInfo(namespace="default", service="api", instance_id="api-instance-x-0",
                            state="running", agent="x", host="hx", runner="process")
    init = SimpleNamespace(namespace="", target="api", argv=["true"], tty=False, interactive=False,
                           workdir="", env={}, width=0, height=0, term="")
    collect, metrics = Collect(), ApiMetrics()
    oversight = Oversight(collect, None, metrics)

    def session(start: bool, exit_code: int | None, exc: BaseException | None) -> list[str]:
        collect.events.clear()
        record = SessionRecord(id="s", user="u", instance=instance, argv=["true"], tty=False)
        oversight.opening(record, Identity("u"), init, 0.0)
        if start:
            oversight.started(record)
        record.exit_code = exit_code
        oversight.ended(record, exc)
        return [e["event"] for e in collect.events]

    assert session(False, None, Unavailable("agent x is not reachable")) == ["session.failed"]
    assert collect.events[0]["stage"] == "open" and collect.events[0]["code"] == "unavailable"
    assert session(True, 0, None) == ["session.started", "session.ended"]
    assert session(True, None, Unavailable("agent x lost")) == ["session.started",
                                                                 "session.failed"]
    assert collect.events[1]["stage"] == "running"
    assert metrics.sessions.labels("failed")._value.get() == 2
    assert metrics.sessions.labels("success")._value.get() == 1
    assert metrics.active._value.get() == 0


def test_buffer_is_bounded_in_bytes_too():
    """A burst of large chunks drops the oldest once the byte cap is reached, and counts it."""
    publisher = BufferedPublisher(None, "test recording", limit=1000, limit_bytes=1000)
    for i in range(10):
        publisher.submit("rune.rec.s.data", bytes([i]) * 300)
    assert publisher.buffered == 3
    assert publisher.dropped == 7
    assert [data[0] for _, data, _ in publisher._buffer] == [7, 8, 9]


async def test_a_bad_subject_is_dropped_and_the_rest_flows(nats_url):
    """A message nats cannot send (a subject with a newline) is dropped with its reason at
    once; the messages behind it are stored."""
    subjects = Subjects("bad")
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(StreamConfig(name="BAD_AUDIT",
                                                 subjects=[subjects.audit_all()]))
    publisher = BufferedPublisher(nc, "test audit", ack_timeout=0.5)
    await publisher.start()
    try:
        publisher.submit("bad.audit.default\n.session.denied", b"poison")
        publisher.submit(subjects.audit("default", schema.ENDED), b"after")
        assert await publisher.flush(5)
        assert publisher.published == 1 and publisher.rejected == {"invalid subject": 1}
        sub = await nc.jetstream().pull_subscribe(subjects.audit_all(), stream="BAD_AUDIT")
        assert [m.data for m in await sub.fetch(10, timeout=2)] == [b"after"]
    finally:
        await publisher.stop()
        await nc.close()


async def test_a_message_the_broker_never_stores_does_not_hold_up_the_rest(nats_url):
    """A head message that keeps failing while the next one is stored (no stream takes its
    subject, as with a permissions violation) is dropped; everything else is stored."""
    subjects = Subjects("stuck")
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(StreamConfig(name="STUCK_AUDIT",
                                                 subjects=[subjects.audit_all()]))
    publisher = BufferedPublisher(nc, "test audit", ack_timeout=0.3)
    await publisher.start()
    try:
        publisher.submit("stuck.elsewhere.x", b"never stored")
        for i in range(3):
            publisher.submit(subjects.audit("default", schema.ENDED), f"{i}".encode())
        assert await publisher.flush(15)
        assert publisher.published == 3 and publisher.dropped == 1
        assert len(publisher.rejected) == 1
        sub = await nc.jetstream().pull_subscribe(subjects.audit_all(), stream="STUCK_AUDIT")
        assert sorted(m.data for m in await sub.fetch(10, timeout=2)) == [b"0", b"1", b"2"]
    finally:
        await publisher.stop()
        await nc.close()


def test_tables_escape_control_characters():
    """An argv or a user with a newline or a terminal escape is shown escaped: it cannot
    move the cursor or add a row of its own."""
    forged = {"event": "session.ended", "time": "2026-01-02T03:04:05.678Z",
              "user": "u\x1b[2J", "namespace": "n", "instance": "i",
              "argv": ["echo", "x\n2026-01-02 03:04:05  ended  root"], "exit_code": 0}
    lines = render([("A", "B", "C", "D", "E", "F", "G"), row(forged)])
    assert len(lines) == 2
    assert "\x1b" not in lines[1] and "\n" not in lines[1]
    assert "u\\x1b[2J" in lines[1] and 'echo "x\\n2026-01-02 03:04:05  ended  root"' in lines[1]
