"""Live output of a session to read-only observers: a small fan-out with bounded queues,
and the observe session kind that streams it to an operator.

The relay hands every output chunk to `tap_output` (one call on the data path: a
byte counter on the record and a dict lookup while nobody watches). Each observer
has its own queue bounded in bytes; a slow observer loses its oldest chunks, counted,
and never slows the session or the other observers down.

An observer is a session of the core (ObserveKind, `on_agent = False`): admitted with
verb `observe` in the observed session's namespace, counted per user, listed (argv
`rune-observe <session id>`), audited `session.observed` then ended/failed, killable, and
timed out like any session. It ends when the observed session does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from rune import audit as schema
from rune.errors import RuneError
from rune.proto import exec_pb2 as pb

OBSERVER_BYTES = 1024 * 1024  # what one observer may lag behind before it loses output
OBSERVE_POLL = 0.5  # seconds between checks that an observed session still runs
OBSERVE_ARGV0 = "rune-observe"


class Observer:
    """One operator's view of one session: output chunks waiting to be sent, newest last."""

    def __init__(self, limit: int = OBSERVER_BYTES) -> None:
        self.limit = limit
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.dropped = 0
        self._ready = asyncio.Event()

    def put(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        while self.size > self.limit and self.chunks:
            old = self.chunks.popleft()
            self.size -= len(old)
            self.dropped += len(old)
        self._ready.set()

    async def get(self, timeout: float) -> bytes | None:
        """Everything waiting, joined; None when nothing came within `timeout`."""
        if not self.chunks:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return None
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.size = 0
        return data


class ObserverHub:
    """Observers per session id; an entry exists only while someone watches."""

    def __init__(self) -> None:
        self.watching: dict[str, set[Observer]] = {}

    def watch(self, session_id: str, limit: int = OBSERVER_BYTES) -> Observer:
        observer = Observer(limit)
        self.watching.setdefault(session_id, set()).add(observer)
        return observer

    def unwatch(self, session_id: str, observer: Observer) -> None:
        found = self.watching.get(session_id)
        if found is not None:
            found.discard(observer)
            if not found:
                del self.watching[session_id]

    def output(self, session_id: str, data: bytes) -> None:
        for observer in self.watching.get(session_id, ()):
            observer.put(data)


hub = ObserverHub()


def tap_output(record: Any, data: bytes) -> None:
    """Called by the relay for each stdout/stderr chunk on its way to the client."""
    # The record's byte count is final only at the end; live listings read this one.
    record.bytes_out += len(data)
    if hub.watching:
        hub.output(record.id, data)


class ObserveKind:
    """The observe session kind: an operator's read-only tail of one live session."""

    name = "observe"
    window = 0
    on_agent = False
    started_event = schema.OBSERVED

    def __init__(self, context: Any, observed: Any, sessions: dict, recordings: Any) -> None:
        self.context = context
        self.observed = observed
        self.sessions = sessions
        self.recordings = recordings

    async def started(self, session: Any, opened: Any) -> None:
        record, observed = session.record, self.observed
        record.host = observed.host or observed.instance.host
        # Who is watched, in the observer's own events (user is the operator).
        record.extra = {"observed_session_id": observed.id, "session_user": observed.user}
        # session.observed is about the watched session, as session.killed is: its
        # session_id is that session's, the observer's own id rides beside it.
        record.started_extra = {"session_id": observed.id, "observer_session_id": record.id}

    async def feed(self, session: Any) -> None:
        """An observer sends nothing after its request."""

    async def relay(self, session: Any) -> None:
        record, observed = session.record, self.observed
        # Watch before reading the recording, with no await between: every byte is either
        # in the recording up to `upto` or in this observer's queue, never in neither.
        observer = hub.watch(observed.id)
        upto = None
        if observed.tap is not None:
            observed.tap.flush()
            upto = observed.tap.bytes
        try:
            if upto:
                async for chunk in recorded_so_far(self.recordings, observed.id, upto):
                    await self._write(record, chunk)
            while True:
                data = await observer.get(OBSERVE_POLL)
                if data:
                    await self._write(record, pb.ObserveChunk(data=data,
                                                              dropped=observer.dropped))
                elif self.sessions.get(observed.id) is not observed:
                    await self.context.write(pb.ObserveChunk(
                        ended=True, dropped=observer.dropped,
                        reason=observed.kill_reason or "the session ended"))
                    record.exit_code = 0  # the observer saw the session to its end
                    return
                # Idle while the watched session is: its input counts as activity too.
                record.last_io = max(record.last_io, observed.last_io)
                record.writing = observed.writing
        finally:
            hub.unwatch(observed.id, observer)

    async def _write(self, record: Any, chunk: pb.ObserveChunk) -> None:
        record.writing = True
        try:
            await self.context.write(chunk)
        finally:
            record.writing = False
            record.last_io = time.monotonic()
            record.bytes_out += len(chunk.data)


async def recorded_so_far(recordings: Any, session_id: str,
                          upto: int) -> AsyncIterator[pb.ObserveChunk]:
    """The recording's output up to byte `upto`, with its terminal sizes."""
    if recordings is None:
        return
    await recordings.publisher.flush(2.0)
    sent = 0
    try:
        async for block in recordings.cast(session_id):
            for line in block.decode("utf-8", "surrogateescape").splitlines():
                chunk = cast_line(line)
                if chunk is None:
                    continue
                if chunk.data:
                    chunk.data = chunk.data[:upto - sent]
                    sent += len(chunk.data)
                yield chunk
                if sent >= upto:
                    return
    except RuneError:
        return  # nothing stored yet: the live part follows


def cast_line(line: str) -> pb.ObserveChunk | None:
    """One asciicast v2 line as an observer chunk (header and resizes give the size)."""
    try:
        item = json.loads(line)
    except ValueError:
        return None
    if isinstance(item, dict):
        return pb.ObserveChunk(width=int(item.get("width") or 0),
                               height=int(item.get("height") or 0))
    if not isinstance(item, list) or len(item) != 3:
        return None
    _, code, text = item
    if code == "o":
        return pb.ObserveChunk(data=str(text).encode("utf-8", "surrogateescape"))
    if code == "r":
        width, _, height = str(text).partition("x")
        if width.isdigit() and height.isdigit():
            return pb.ObserveChunk(width=int(width), height=int(height))
    return None
