"""Live output of a session to read-only observers: a small fan-out with bounded queues.

The relay hands every output chunk to `tap_output` (one call on the data path: a
byte counter on the record and a dict lookup while nobody watches). Each observer
has its own queue bounded in bytes; a slow observer loses its oldest chunks, counted,
and never slows the session or the other observers down.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

OBSERVER_BYTES = 1024 * 1024  # what one observer may lag behind before it loses output


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
