"""TTY session recording, kept in a JetStream stream with retention, replayed as asciicast v2.

Each session has two subjects: `<prefix>.rec.<id>.data` carries the recording (a header,
then timed output, input and resize events, in chunks) and `<prefix>.rec.<id>.meta` a
JSON summary, sent at the start and again at the end, so a listing reads only the last
meta message of each session.

A chunk holds the events as they came, bytes and all (RAW_CHUNK, then per event its time,
kind and size, then the bytes): recording costs the relay a copy, not a UTF-8 decode and a
JSON escape per byte (six bytes stored for every byte of binary output, which capped a
bulk TTY stream). The asciicast v2 text is made when a recording is read (CastText):
output is decoded as UTF-8 with `surrogateescape`, so bytes that are not UTF-8 survive the
JSON round trip and a replay writes exactly the bytes the user saw. Chunks stored as
asciicast text by earlier versions are read as they are.
"""

from __future__ import annotations

import codecs
import json
import logging
import struct
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

# A chunk of the recording: up to this much before it is published (plus one event of at
# most PIECE bytes: still under max_payload). Fewer, larger chunks are fewer stream
# messages and acks for the same bytes.
FLUSH_BYTES = 512 * 1024
FLUSH_SECONDS = 0.5
PIECE = 32 * 1024  # characters per cast event in the asciicast text
RAW_PIECE = 256 * 1024  # bytes per stored event
RAW_CHUNK = b"\0rune-recording-1\n"  # a chunk of asciicast text starts with '{' or '['
EVENT = struct.Struct("<dcI")  # seconds since the start, kind, size of the bytes that follow
HEADER, OUTPUT, INPUT, RESIZE = b"h", b"o", b"i", b"r"


class RecordingSettings(BaseModel):
    enabled: bool = Field(default=True, description="record TTY sessions")
    keystrokes: bool = Field(default=False, description="also record what the user typed")
    max_age: float = Field(default=30 * DAY, description="seconds a recording is kept; 0=forever")
    max_bytes: int = Field(default=4 << 30, description="stream size cap; oldest go first")
    buffer: int = Field(default=4096, description="chunks held while the stream is away")


class Recorder:
    """Keeps one session's output, input and resizes as timed events, in chunks."""

    def __init__(self, store: Recordings, session_id: str, meta: dict[str, Any],
                 width: int, height: int, term: str, keystrokes: bool) -> None:
        self.store = store
        self.session_id = session_id
        self.meta = meta
        self.keystrokes = keystrokes
        self._t0 = time.monotonic()
        self._pending: list[bytes] = [RAW_CHUNK]
        self._pending_size = 0
        self._last_flush = self._t0
        self.bytes = 0
        header = {"version": 2, "width": width or 80, "height": height or 24,
                  "timestamp": int(meta["started"]), "env": {"TERM": term or "xterm"},
                  "title": f"{meta['user']}@{meta['instance']}: {' '.join(meta['argv'])}"}
        self._event(HEADER, json.dumps(header).encode())
        self.store.publish_meta(session_id, {**meta, "state": "recording"})

    def _event(self, kind: bytes, data: bytes) -> None:
        now = time.monotonic()
        at = now - self._t0
        for i in range(0, len(data), RAW_PIECE):
            piece = data[i:i + RAW_PIECE] if len(data) > RAW_PIECE else data
            self._pending += (EVENT.pack(at, kind, len(piece)), piece)
            self._pending_size += EVENT.size + len(piece)
            if self._pending_size >= FLUSH_BYTES:
                self.flush()
        if now - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def output(self, data: bytes) -> None:
        self.bytes += len(data)
        if data:
            self._event(OUTPUT, data)

    def input(self, data: bytes) -> None:
        if self.keystrokes and data:
            self._event(INPUT, data)

    def resize(self, width: int, height: int) -> None:
        self._event(RESIZE, f"{width}x{height}".encode())

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._pending_size:
            self.store.publish_data(self.session_id, b"".join(self._pending))
            self._pending = [RAW_CHUNK]
            self._pending_size = 0

    def close(self, summary: dict[str, Any]) -> None:
        self.flush()
        self.store.publish_meta(self.session_id, {**self.meta, **summary,
                                                  "state": "complete", "bytes": self.bytes})


class CastText:
    """A recording's chunks as asciicast v2 text: each chunk in, whole lines out."""

    def __init__(self) -> None:
        self._decoders = {code: codecs.getincrementaldecoder("utf-8")("surrogateescape")
                          for code in (OUTPUT, INPUT)}
        self._last = 0.0

    def lines(self, chunk: bytes) -> bytes:
        if not chunk.startswith(RAW_CHUNK):
            return chunk  # stored as asciicast text already
        out: list[str] = []
        view, offset = memoryview(chunk), len(RAW_CHUNK)
        while offset + EVENT.size <= len(chunk):
            at, kind, size = EVENT.unpack_from(chunk, offset)
            offset += EVENT.size
            data = view[offset:offset + size]
            offset += size
            self._last = at
            if kind == HEADER:
                out.append(bytes(data).decode() + "\n")
            elif kind in self._decoders:
                self._text(out, at, kind, self._decoders[kind].decode(data))
            elif kind == RESIZE:
                self._text(out, at, kind, bytes(data).decode(errors="replace"))
        return "".join(out).encode()

    def end(self) -> bytes:
        """What a split UTF-8 sequence at the very end leaves (escaped as it came)."""
        out: list[str] = []
        for kind, decoder in self._decoders.items():
            self._text(out, self._last, kind, decoder.decode(b"", final=True))
        return "".join(out).encode()

    @staticmethod
    def _text(out: list[str], at: float, kind: bytes, text: str) -> None:
        # json.dumps([t, code, piece]), without the encoder's walk of a list per event:
        # the time is a float, the code one letter, the piece escaped by json's own C code.
        head = f"[{round(at, 6)!r}, \"{kind.decode()}\", "
        for i in range(0, len(text), PIECE):
            out.append(head + encode_basestring_ascii(text[i:i + PIECE]) + "]\n")


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
        text = CastText()
        async for msg in read_stream(self.nc, self.subjects.recordings_stream,
                                     self.subjects.recording_data(session_id)):
            any_data = True
            lines = text.lines(msg.data)
            if lines:
                yield lines
        if not any_data:
            raise NotFound(f"no recording of session {session_id}")
        tail = text.end()
        if tail:
            yield tail
