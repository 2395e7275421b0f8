"""Audit search for dashboards: filters run here, pages walk the stream by sequence number.

A page is one short-lived JetStream consumer that starts at the cursor (a stream
sequence), narrowed by subject where the filter allows (namespace, event kind),
and reads at most SCAN_LIMIT messages or for SCAN_SECONDS: a search never loads the
whole stream, however large, and a sparse filter still answers within about a
second, with a cursor to go on.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from rune.apiserver.audit import subject_token

from rune import audit as schema
from rune.errors import InvalidArgument
from rune.subjects import Subjects

PAGE_LIMIT = 500  # matches per page at most
SCAN_LIMIT = 20000  # stream messages one page looks at, at most
SCAN_SECONDS = 1.0  # and for about this long
BATCH = 512


@dataclass(frozen=True)
class AuditFilter:
    namespace: str = ""
    user: str = ""
    instance: str = ""
    event: str = ""
    exit_code: int | None = None
    denied_only: bool = False
    since: float = 0.0
    until: float = 0.0

    @classmethod
    def from_request(cls, request: Any) -> AuditFilter:
        event = request.event
        if event and event not in schema.EVENTS:
            raise InvalidArgument(f"unknown event {event!r}: one of {', '.join(schema.EVENTS)}")
        if request.denied_only:
            if event and event != schema.DENIED:
                raise InvalidArgument("denied_only goes with no event or session.denied")
            event = schema.DENIED
        return cls(namespace=request.namespace, user=request.user,
                   instance=request.instance, event=event,
                   exit_code=request.exit_code if request.has_exit_code else None,
                   denied_only=request.denied_only, since=max(0.0, request.since),
                   until=max(0.0, request.until))

    def subject(self, subjects: Subjects) -> str:
        namespace = subject_token(self.namespace) if self.namespace else "*"
        tail = self.event or ">"
        return f"{subjects.prefix}.audit.{namespace}.{tail}"

    def matches(self, event: dict[str, Any]) -> bool:
        if self.user and event.get("user") != self.user:
            return False
        if self.instance and event.get("instance") != self.instance:
            return False
        if self.exit_code is not None and event.get("exit_code") != self.exit_code:
            return False
        if self.until and _time(event) > self.until:
            return False
        return True


def _time(event: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(event.get("time", "")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def parse_cursor(cursor: str) -> int:
    if not cursor:
        return 0
    if not cursor.isdigit() or len(cursor) > 20:
        raise InvalidArgument("bad cursor: use the next_cursor of a previous page")
    return int(cursor)


class AuditSearch:
    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self.nc = nc
        self.subjects = subjects

    async def _consumer(self, f: AuditFilter, start_seq: int, new_only: bool = False) -> Any:
        if start_seq:
            policy = dict(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
        elif new_only:
            policy = dict(deliver_policy=DeliverPolicy.NEW)
        elif f.since:
            policy = dict(deliver_policy=DeliverPolicy.BY_START_TIME,
                          opt_start_time=datetime.fromtimestamp(f.since, UTC))
        else:
            policy = dict(deliver_policy=DeliverPolicy.ALL)
        config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30.0,
                                mem_storage=True, **policy)
        return await self.nc.jetstream().pull_subscribe(
            f.subject(self.subjects), stream=self.subjects.audit_stream, config=config)

    async def _close(self, sub: Any) -> None:
        try:
            await self.nc.jetstream().delete_consumer(self.subjects.audit_stream,
                                                      (await sub.consumer_info()).name)
        except Exception:
            pass  # inactive_threshold removes it anyway
        await sub.unsubscribe()

    async def page(self, f: AuditFilter, cursor: str, limit: int,
                   visible: Callable[[str], bool]) -> tuple[list[tuple[int, dict]], str, int]:
        """(seq, event) pairs in stream order, the next cursor ('' at the end), scanned."""
        limit = max(1, min(limit or 100, PAGE_LIMIT))
        sub = await self._consumer(f, parse_cursor(cursor))
        found: list[tuple[int, dict]] = []
        scanned, next_seq = 0, 0
        deadline = time.monotonic() + SCAN_SECONDS
        try:
            pending = (await sub.consumer_info()).num_pending
            while pending > 0 and len(found) < limit and scanned < SCAN_LIMIT and \
                    time.monotonic() < deadline:
                try:
                    msgs = await sub.fetch(min(BATCH, pending), timeout=1.0)
                except (TimeoutError, NatsTimeout):
                    break
                for msg in msgs:
                    scanned += 1
                    seq = msg.metadata.sequence.stream
                    next_seq, pending = seq + 1, msg.metadata.num_pending
                    event = _decode(msg.data)
                    if event is None:
                        continue
                    if f.until and _time(event) > f.until:
                        return found, "", scanned  # the stream is in time order: done
                    if f.matches(event) and visible(str(event.get("namespace", ""))):
                        found.append((seq, event))
                        if len(found) >= limit:
                            break
        finally:
            await self._close(sub)
        if pending <= 0:
            return found, "", scanned
        return found, str(next_seq) if next_seq else (cursor or "1"), scanned

    async def follow(self, f: AuditFilter, cursor: str,
                     visible: Callable[[str], bool]) -> AsyncIterator[tuple[int, dict]]:
        """Matching events after the cursor (without one: from now on), as they come."""
        start = parse_cursor(cursor)
        sub = await self._consumer(f, start, new_only=not start)
        try:
            while True:
                try:
                    msgs = await sub.fetch(BATCH, timeout=5.0)
                except (TimeoutError, NatsTimeout):
                    continue
                for msg in msgs:
                    event = _decode(msg.data)
                    if event is not None and f.matches(event) and \
                            visible(str(event.get("namespace", ""))):
                        yield msg.metadata.sequence.stream, event
        finally:
            await self._close(sub)


def _decode(data: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(data)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None
