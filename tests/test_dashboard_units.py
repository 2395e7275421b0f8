"""Units behind the dashboard: observer queues, audit filters, cursors, cast lines, sign-ins."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from rune.apiserver.audit_search import AuditFilter, parse_cursor
from rune.apiserver.observe import Observer, ObserverHub, hub, tap_output
from rune.apiserver.observe import cast_line as _cast_line
from rune.apiserver.session import kill_reason as _reason
from rune.dashboard.signin import SignIns, same_secret

from rune.errors import InvalidArgument
from rune.proto import exec_pb2 as pb
from rune.subjects import Subjects


async def test_slow_observer_loses_oldest_output_and_counts_it():
    """Past its byte limit an observer drops the oldest chunks and says how many bytes."""
    observer = Observer(limit=10)
    for chunk in (b"aaaa", b"bbbb", b"cccc"):
        observer.put(chunk)
    assert observer.dropped == 4
    assert await observer.get(0.1) == b"bbbbcccc"
    assert await observer.get(0.05) is None


async def test_observer_wakes_on_new_output():
    """A waiting observer gets output as soon as it arrives."""
    observer = Observer()
    waiter = asyncio.create_task(observer.get(5.0))
    await asyncio.sleep(0.01)
    observer.put(b"x")
    assert await asyncio.wait_for(waiter, 1.0) == b"x"


def test_hub_keeps_entries_only_while_watched():
    """The hub forgets a session once its last observer leaves; output reaches every one."""
    local = ObserverHub()
    one, two = local.watch("s1"), local.watch("s1")
    local.output("s1", b"hi")
    local.output("other", b"nobody")
    assert list(one.chunks) == [b"hi"] and list(two.chunks) == [b"hi"]
    local.unwatch("s1", one)
    local.unwatch("s1", two)
    assert local.watching == {}


def test_tap_output_counts_bytes_without_observers():
    """The relay's hook keeps the live byte count even when nobody watches."""
    record = SimpleNamespace(id="nobody-watches", bytes_out=0)
    tap_output(record, b"12345")
    assert record.bytes_out == 5 and "nobody-watches" not in hub.watching


def test_audit_filter_narrows_by_subject_and_refuses_nonsense():
    """Namespace and event become the subject filter; unknown events and cursors are refused."""
    s = Subjects("rune")
    f = AuditFilter.from_request(pb.AuditSearchRequest(namespace="prod", event="session.ended"))
    assert f.subject(s) == "rune.audit.prod.session.ended"
    assert AuditFilter.from_request(pb.AuditSearchRequest(denied_only=True)).subject(s) == \
        "rune.audit.*.session.denied"
    assert AuditFilter.from_request(pb.AuditSearchRequest(namespace="a.b>")).subject(s) == \
        "rune.audit._invalid.>"
    with pytest.raises(InvalidArgument):
        AuditFilter.from_request(pb.AuditSearchRequest(event="session.>"))
    with pytest.raises(InvalidArgument):
        AuditFilter.from_request(pb.AuditSearchRequest(event="session.ended", denied_only=True))
    assert parse_cursor("") == 0 and parse_cursor("42") == 42
    for bad in ("-1", "4 2", "1e9", "9" * 30):
        with pytest.raises(InvalidArgument):
            parse_cursor(bad)


def test_audit_filter_matches_fields():
    """User, instance, exit code and end time are checked on each event."""
    f = AuditFilter(user="ann", instance="api-instance-a-0", exit_code=0, until=2e9)
    event = {"user": "ann", "instance": "api-instance-a-0", "exit_code": 0,
             "time": "2026-12-01T10:00:00.000Z"}
    assert f.matches(event)
    assert not f.matches({**event, "exit_code": 1})
    assert not f.matches({**event, "user": "bob"})
    assert not AuditFilter(until=1.0).matches(event)


def test_cast_lines_become_observer_chunks():
    """Header and resizes give the size; output keeps bytes that are not UTF-8."""
    header = _cast_line('{"version": 2, "width": 100, "height": 30}')
    assert (header.width, header.height) == (100, 30)
    assert _cast_line('[0.5, "o", "h\\udcffi"]').data == b"h\xffi"
    assert (_cast_line('[1, "r", "120x40"]').width, _cast_line('[1, "r", "120x40"]').height) \
        == (120, 40)
    for junk in ("", "not json", '[1, "i", "typed"]', '[1, "r", "axb"]', "[1]"):
        assert _cast_line(junk) is None


def test_kill_reason_is_printable_and_bounded():
    """What the user's terminal prints can carry no escape sequence."""
    assert _reason(" disk\x1b[2J full\n") == "disk?[2J full"
    assert len(_reason("x" * 5000)) == 256


def test_sign_ins_expire_and_are_bounded():
    """Sign-ins end after their idle time and the oldest go past the limit."""
    signins = SignIns(idle=0.0, limit=2)
    sid, _ = signins.create("t")
    assert signins.get(sid) is None  # idle time 0: gone at once
    bounded = SignIns(limit=2)
    first, _ = bounded.create("a")
    bounded.create("b")
    bounded.create("c")
    assert bounded.get(first) is None
    assert same_secret("abc", "abc") and not same_secret("", "abc")
    assert not same_secret(None, "abc")
