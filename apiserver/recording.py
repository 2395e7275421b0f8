"""TTY session recording as asciicast v2, kept in a JetStream stream with retention.

Each session has two subjects: `<prefix>.rec.<id>.data` carries the cast itself
(header line, then `[time, "o"|"i"|"r", data]` lines, in chunks) and
`<prefix>.rec.<id>.meta` a JSON summary, sent at the start and again at the end,
so a listing reads only the last meta message of each session.

Output is decoded as UTF-8 with `surrogateescape`, so bytes that are not UTF-8
survive the JSON round trip and a replay writes exactly the bytes the user saw.
"""

from __future__ import annotations

import codecs
import json
import logging
import time
from collections.abc import AsyncIterator
from json.encoder import encode_basestring_ascii
from typing import Any

from nats.aio.client import Client as NATS
from pydantic import BaseModel, Field
from rune.apiserver.audit import DAY, ensure_stream, read_stream

from rune.audit import BufferedPublisher
from rune.errors import NotFound
from rune.subjects import Subjects

log = logging.getLogger(__name__)

# A chunk of the cast: up to this much before it is published (plus one event of at most
# PIECE characters, ~6 bytes each when escaped: still far under max_payload). Fewer,
# larger chunks are fewer stream messages and acks for the same bytes.
FLUSH_BYTES = 512 * 1024
FLUSH_SECONDS = 0.5
PIECE = 32 * 1024  # characters per cast event, so a chunk stays far under max_payload


class RecordingSettings(BaseModel):
    enabled: bool = Field(default=True, description="record TTY sessions")
    keystrokes: bool = Field(default=False, description="also record what the user typed")
    max_age: float = Field(default=30 * DAY, description="seconds a recording is kept; 0=forever")
    max_bytes: int = Field(default=4 << 30, description="stream size cap; oldest go first")
    buffer: int = Field(default=4096, description="chunks held while the stream is away")


class Recorder:
    """Turns one session's output, input and resizes into asciicast v2 chunks."""

    def __init__(self, store: Recordings, session_id: str, meta: dict[str, Any],
                 width: int, height: int, term: str, keystrokes: bool) -> None:
        self.store = store
        self.session_id = session_id
        self.meta = meta
        self.keystrokes = keystrokes
        self._t0 = time.monotonic()
        self._out = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._in = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._pending: list[str] = []
        self._pending_size = 0
        self._last_flush = self._t0
        self.bytes = 0
        header = {"version": 2, "width": width or 80, "height": height or 24,
                  "timestamp": int(meta["started"]), "env": {"TERM": term or "xterm"},
                  "title": f"{meta['user']}@{meta['instance']}: {' '.join(meta['argv'])}"}
        self._line(json.dumps(header))
        self.store.publish_meta(session_id, {**meta, "state": "recording"})

    def _line(self, text: str) -> None:
        self._pending.append(text + "\n")
        self._pending_size += len(text) + 1

    def _event(self, code: str, text: str) -> None:
        # json.dumps([t, code, piece]), without the encoder's walk of a list per event:
        # the time is a float, the code one letter, the piece escaped by json's own C code.
        head = f"[{round(time.monotonic() - self._t0, 6)!r}, \"{code}\", "
        for i in range(0, len(text), PIECE):
            self._line(head + encode_basestring_ascii(text[i:i + PIECE]) + "]")
            if self._pending_size >= FLUSH_BYTES:
                self.flush()
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def output(self, data: bytes) -> None:
        self.bytes += len(data)
        text = self._out.decode(data)
        if text:
            self._event("o", text)

    def input(self, data: bytes) -> None:
        if self.keystrokes:
            text = self._in.decode(data)
            if text:
                self._event("i", text)

    def resize(self, width: int, height: int) -> None:
        self._event("r", f"{width}x{height}")

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._pending:
            self.store.publish_data(self.session_id, "".join(self._pending).encode())
            self._pending.clear()
            self._pending_size = 0

    def close(self, summary: dict[str, Any]) -> None:
        tail = self._out.decode(b"", final=True)
        if tail:
            self._event("o", tail)
        self.flush()
        self.store.publish_meta(self.session_id, {**self.meta, **summary,
                                                  "state": "complete", "bytes": self.bytes})


class Recordings:
    """The recordings stream: writes through a non-blocking publisher, lists and replays."""

    def __init__(self, nc: NATS, subjects: Subjects, settings: RecordingSettings) -> None:
        self.nc = nc
        self.subjects = subjects
        self.settings = settings
        self.publisher = BufferedPublisher(nc, "recording", settings.buffer, ensure=self._ensure)

    async def _ensure(self) -> None:
        await ensure_stream(self.nc, self.subjects.recordings_stream,
                            [self.subjects.recording_all()], self.settings.max_age,
                            self.settings.max_bytes, "Rune Exec TTY session recordings")

    async def start(self) -> None:
        await self.publisher.start()

    async def stop(self) -> None:
        await self.publisher.stop()

    def recorder(self, session_id: str, meta: dict[str, Any], width: int, height: int,
                 term: str, keystrokes: bool | None = None) -> Recorder | None:
        """A recorder for one session; `keystrokes` None: as the settings say."""
        if not self.settings.enabled:
            return None
        return Recorder(self, session_id, meta, width, height, term,
                        self.settings.keystrokes if keystrokes is None else keystrokes)

    def publish_data(self, session_id: str, data: bytes) -> None:
        self.publisher.submit(self.subjects.recording_data(session_id), data)

    def publish_meta(self, session_id: str, meta: dict[str, Any]) -> None:
        self.publisher.submit(self.subjects.recording_meta(session_id),
                              json.dumps(meta, sort_keys=True).encode())

    async def list(self) -> list[dict[str, Any]]:
        """The latest summary of every recorded session still kept."""
        await self._ensure()
        found = []
        async for msg in read_stream(self.nc, self.subjects.recordings_stream,
                                     self.subjects.recording_meta_all(),
                                     last_per_subject=True):
            try:
                found.append(json.loads(msg.data))
            except ValueError:
                continue
        return found

    async def meta(self, session_id: str) -> dict[str, Any] | None:
        """The latest summary of one recorded session, or None."""
        await self._ensure()
        found = None
        async for msg in read_stream(self.nc, self.subjects.recordings_stream,
                                     self.subjects.recording_meta(session_id),
                                     last_per_subject=True):
            try:
                found = json.loads(msg.data)
            except ValueError:
                continue
        return found

    async def cast(self, session_id: str) -> AsyncIterator[bytes]:
        """The asciicast v2 text of a session, in chunks of whole lines."""
        await self._ensure()
        any_data = False
        async for msg in read_stream(self.nc, self.subjects.recordings_stream,
                                     self.subjects.recording_data(session_id)):
            any_data = True
            yield msg.data
        if not any_data:
            raise NotFound(f"no recording of session {session_id}")
