"""Audit events: the versioned JSON schema, and a JetStream publisher that never blocks.

Every event is one JSON object with ``version`` (this schema's number), ``event``
(one of EVENTS), ``id`` (unique, also the JetStream de-duplication id) and
``time`` (RFC 3339, UTC); the other fields are described in the README.

The publisher keeps a bounded buffer drained by its own task: a session only
appends to it. When the broker or the stream is unreachable, events wait there
and are retried; past the bound the oldest are dropped, counted and logged.
The task publishes up to PIPELINE messages at once and then waits for their acks
together (one round trip for the lot, not one each: a fan-out of thousands audits two
events per member); they leave in order on one connection, so JetStream stores them in
order. One message never holds up the rest: a permanent failure (a subject or payload the
broker cannot take, a 4xx from JetStream) drops that message at once with a counted
reason; a message that failed POISON_ATTEMPTS times while a later one was stored
(a permissions violation shows only as a timeout) is dropped the same way; a message that
failed while later ones were stored is retried after them (its id makes a repeat
harmless). When every message of a round fails, it is an outage: everything waits, in
order.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import BadSubjectError, MaxPayloadError
from nats.js.errors import APIError

from rune.ratelog import RateLimitedLog

log = logging.getLogger(__name__)
loss_log = RateLimitedLog(log)

VERSION = 1
STARTED = "session.started"
ENDED = "session.ended"
DENIED = "session.denied"
FAILED = "session.failed"
# Operators acting on a live session: watching it read-only, ending it with a reason.
OBSERVED = "session.observed"
KILLED = "session.killed"
EVENTS = (STARTED, ENDED, DENIED, FAILED, OBSERVED, KILLED)
MAX_RETRY_DELAY = 5.0
POISON_ATTEMPTS = 3
PIPELINE = 128  # messages in flight at once (each waits for its own ack)


_second: list = [None, ""]  # the last whole second formatted, and its text


def iso_time(ts: float) -> str:
    """RFC 3339 in UTC to the millisecond (`2026-12-02T01:13:05.123Z`)."""
    whole = int(ts)
    micros = round((ts - whole) * 1e6)  # as datetime rounds a timestamp
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    if _second[0] != whole:  # formatted once a second, not once an event
        _second[:] = [whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{micros // 1000:03d}Z"


# Ids: 64 random bits for this process, then a count. As unique as uuid4 for de-duplication
# and 32 hex digits like it, without a read of the system's random source per event.
_ID_PREFIX = uuid.uuid4().hex[:16]
_ids = itertools.count(int.from_bytes(os.urandom(4), "big"))


def event_id() -> str:
    return f"{_ID_PREFIX}{next(_ids) & 0xFFFFFFFFFFFFFFFF:016x}"


def make_event(event: str, **fields: Any) -> dict[str, Any]:
    """A new event of kind `event` stamped with version, id and the current time."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    return {"version": VERSION, "event": event, "id": event_id(),
            "time": iso_time(time.time()), **fields}


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


class BufferedPublisher:
    """Publishes (subject, data, id) to JetStream from a bounded buffer on its own task."""

    def __init__(self, nc: NATS, what: str, limit: int = 10000, ack_timeout: float = 2.0,
                 ensure: Callable[[], Awaitable[None]] | None = None,
                 limit_bytes: int = 32 * 1024 * 1024) -> None:
        self.nc = nc
        self.what = what
        self.limit = limit
        self.limit_bytes = limit_bytes
        self._buffered_bytes = 0
        self.ack_timeout = ack_timeout
        self._ensure = ensure
        self._ensured = False
        self._js: Any = None
        self._buffer: deque[tuple[str, bytes, str]] = deque()
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._task: asyncio.Task | None = None
        self.published = 0
        self.dropped = 0
        self.failures = 0
        self.rejected: dict[str, int] = {}  # reason -> messages dropped as undeliverable
        self._attempts: dict[str, int] = {}  # id -> failed publishes of that message
        self._overtaken: set[str] = set()  # failed ids after which a message was stored

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def submit(self, subject: str, data: bytes, msg_id: str | None = None) -> None:
        """Queues one message; never waits. Drops (and counts) the oldest when full, by count
        or by bytes, so a fast session can never grow the server's memory."""
        while self._buffer and (len(self._buffer) >= self.limit
                                or self._buffered_bytes + len(data) > self.limit_bytes):
            _, gone, gone_id = self._buffer.popleft()
            self._buffered_bytes -= len(gone)
            self._attempts.pop(gone_id, None)
            self._overtaken.discard(gone_id)
            self.dropped += 1
            loss_log.warning(f"{self.what}-drop", "%s buffer full (%d messages, %d bytes): "
                             "dropped the oldest; %d lost so far", self.what, self.limit,
                             self.limit_bytes, self.dropped)
        self._buffer.append((subject, data, msg_id or uuid.uuid4().hex))
        self._buffered_bytes += len(data)
        self._empty.clear()
        self._wake.set()

    async def start(self) -> None:
        await self._try_ensure()
        self._task = asyncio.create_task(self._run())

    async def _try_ensure(self) -> bool:
        if self._ensured or self._ensure is None:
            self._ensured = True
            return True
        try:
            await self._ensure()
        except Exception as exc:
            loss_log.warning(f"{self.what}-ensure", "%s: cannot set up the stream yet: %s",
                             self.what, exc)
            return False
        self._ensured = True
        return True

    async def _run(self) -> None:
        delay = 0.05
        while True:
            if not self._buffer:
                self._empty.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            failed = await self._round()
            if failed is None:
                delay = 0.05
                continue
            subject, msg_id, exc = failed
            loss_log.warning(f"{self.what}-retry", "%s: publish failed (%s: %s); %d "
                             "buffered, retrying", self.what, type(exc).__name__, exc,
                             len(self._buffer))
            if "no response from stream" in str(exc).lower():
                self._ensured = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)

    async def _round(self) -> tuple[str, str, Exception] | None:
        """Publishes the buffer's first PIPELINE messages together; stored ones leave the
        buffer. The first failure worth waiting on (subject, id, error), or None."""
        if not await self._try_ensure():
            self.failures += 1
            subject, _, msg_id = self._buffer[0]
            return subject, msg_id, ConnectionError("stream not set up")
        head = list(itertools.islice(self._buffer, PIPELINE))
        results = await asyncio.gather(*(self._publish(s, d, i) for s, d, i in head),
                                       return_exceptions=True)
        failures: list[tuple[str, str, Exception]] = []
        for (subject, _, msg_id), result in zip(head, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, Exception):
                self.failures += 1
                failures.append((subject, msg_id, result))
                continue
            # The failed ones before it are overtaken: the broker takes what follows them.
            self._overtaken.update(failed_id for _, failed_id, _ in failures)
            self._stored(msg_id)
        waiting = None
        for subject, msg_id, exc in failures:
            reason = _permanent(exc)
            if reason is None:
                attempts = self._attempts.get(msg_id, 0) + 1
                self._attempts[msg_id] = attempts
                if attempts >= POISON_ATTEMPTS and msg_id in self._overtaken:
                    reason = ("refused by the broker while later messages were stored "
                              "(a permissions violation?)")
            if reason is not None:
                self._reject(subject, msg_id, reason)
            elif waiting is None:
                waiting = (subject, msg_id, exc)
        return waiting

    async def _publish(self, subject: str, data: bytes, msg_id: str) -> None:
        """One message, once _round has seen the stream set up."""
        if self._js is None:
            self._js = self.nc.jetstream()
        # The id lets JetStream drop a duplicate when an ack was lost and we retry.
        await self._js.publish(subject, data, timeout=self.ack_timeout,
                               headers={"Nats-Msg-Id": msg_id})

    def _remove(self, msg_id: str) -> bool:
        """Takes one message out of the buffer; False when submit() dropped it meanwhile."""
        self._attempts.pop(msg_id, None)
        self._overtaken.discard(msg_id)
        if self._buffer and self._buffer[0][2] == msg_id:  # the usual case: in order
            self._buffered_bytes -= len(self._buffer.popleft()[1])
            return True
        for entry in self._buffer:
            if entry[2] == msg_id:
                self._buffer.remove(entry)
                self._buffered_bytes -= len(entry[1])
                return True
        return False

    def _stored(self, msg_id: str) -> None:
        self._remove(msg_id)
        self.published += 1

    def _reject(self, subject: str, msg_id: str, reason: str) -> None:
        """Drops one message for good, counted by reason and logged (rate-limited)."""
        if not self._remove(msg_id):
            return
        self.dropped += 1
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        loss_log.warning(f"{self.what}-reject", "%s: dropped a message to %r that cannot be "
                         "stored: %s; %d dropped so far", self.what, subject[:200], reason,
                         self.dropped)

    async def flush(self, timeout: float) -> bool:
        """Waits (bounded) until everything queued so far is stored; True when it was."""
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float = 2.0) -> None:
        if self._task is not None:
            await self.flush(timeout)
            self._task.cancel()
            self._task = None
        if self._buffer:
            self.dropped += len(self._buffer)
            log.error("%s: %d messages could not be stored before shutdown and are lost",
                      self.what, len(self._buffer))
            self._buffer.clear()


def _permanent(exc: Exception) -> str | None:
    """Why retrying `exc` can never succeed, or None for a failure worth retrying."""
    if isinstance(exc, BadSubjectError):
        return "invalid subject"
    if isinstance(exc, MaxPayloadError):
        return "larger than the broker's max_payload"
    if isinstance(exc, APIError) and exc.code is not None and 400 <= exc.code < 500:
        return f"JetStream refused it ({exc.code} {exc.description})"
    return None
