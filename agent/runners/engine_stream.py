"""One exec's hijacked connection as an asyncio protocol: upgrade, then output and stdin.

`POST /exec/{id}/start` with `Connection: Upgrade` / `Upgrade: tcp` answers `101` and the
connection becomes the exec's stream. With a TTY it is raw output; without, every engine
write comes as an 8-byte header (stream id, 3 bytes zero, big-endian size) and its payload.
The loop reads straight into one large buffer (a BufferedProtocol: no bytes object per
read); headers are parsed in place and payloads appended to their stream, so each byte is
copied once on its way out. A stream holding more than HIGH_WATER unread pauses reading:
the engine then stops the command's writes (backpressure down to the command).
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque

from rune.agent.runners.engine_api import (
    CALL_TIMEOUT,
    MAX_HEAD,
    EngineAPI,
    EngineError,
    error_message,
    parse_head,
)

HEADER = struct.Struct(">BxxxI")  # stream id (0 stdin, 1 stdout, 2 stderr, 3 engine error), size
BUFFER_SIZE = 1 << 20
HIGH_WATER = 2 << 20  # unread bytes of one stream that pause reading
LOW_WATER = 512 << 10
CORK_BYTES = 1020 << 10  # frames.MAX_DATA: one piece, one frame
CORK_WINDOW = 0.005  # seconds
CORK_AFTER = 8 << 10


class Output:
    """One output stream: what arrived and is not read yet; b'' at EOF.

    Pieces are kept as they came (one copy out of the read buffer each) and joined only
    when read: no buffer that grows and shrinks, which costs page faults at these sizes.
    A stream in full flow (its last read was CORK_AFTER bytes or more, or came within
    CORK_WINDOW) is handed out in pieces of CORK_BYTES or what a CORK_WINDOW brings, not
    one piece per engine write: fewer, larger frames down the whole relay, at most a
    CORK_WINDOW later. A keystroke's echo is small and never held back.
    """

    def __init__(self, stream: ExecStream) -> None:
        self._stream = stream
        self.pieces: deque[bytes] = deque()
        self.size = 0
        self.eof = False
        self._want = 1  # wake the reader once this many bytes wait
        self._waiter: asyncio.Future[None] | None = None
        self._last_read = 0.0
        self._last_size = 0

    def feed(self, piece: memoryview | bytes) -> None:
        if not piece:
            return
        self.pieces.append(bytes(piece))
        self.size += len(piece)
        if self.size >= self._want:
            self._wake()

    def end(self) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, want: int, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._want = want
        self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._wake) if timeout is not None else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            self._want = 1
            if timer is not None:
                timer.cancel()

    async def read(self, n: int) -> bytes:
        while not self.size:
            if self.eof:
                return b""
            await self._wait(1, None)
        loop = asyncio.get_running_loop()
        want = min(n, CORK_BYTES)
        flowing = self._last_size >= CORK_AFTER or loop.time() - self._last_read < CORK_WINDOW
        if self.size < want and not self.eof and flowing:
            await self._wait(want, CORK_WINDOW)
        self._last_read = loop.time()
        chunk = self._take(n)
        self._last_size = len(chunk)
        self._stream.consumed()
        return chunk

    def _take(self, n: int) -> bytes:
        pieces = self.pieces
        if len(pieces[0]) >= n or len(pieces) == 1:
            first = pieces.popleft()
            if len(first) > n:
                pieces.appendleft(first[n:])
                first = first[:n]
            self.size -= len(first)
            return first
        taken, total = [], 0
        while pieces and total + len(pieces[0]) <= n:
            piece = pieces.popleft()
            taken.append(piece)
            total += len(piece)
        if pieces and total < n:  # the last piece is split
            piece = pieces.popleft()
            taken.append(piece[:n - total])
            pieces.appendleft(piece[n - total:])
            total = n
        self.size -= total
        return b"".join(taken)


class ExecStream(asyncio.BufferedProtocol):
    """The connection of one `exec start`; `started` resolves once the engine upgraded."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.stdout = Output(self)
        self.stderr = Output(self)
        self._outputs = {1: self.stdout, 2: self.stderr, 3: self.stderr}
        self._buffer = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._filled = 0
        self._upgraded = False
        self._frame_stream = 0
        self._frame_left = 0
        self._paused = False
        self._write_paused: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()

    # --- the loop's side --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if not self._upgraded and not self._read_head():
            return
        if self.tty:
            self.stdout.feed(self._view[:self._filled])
            self._filled = 0
        else:
            self._demux()
        self._pause_if_full()

    def eof_received(self) -> bool:
        return False  # the engine is done sending: close, our half-closed stdin included

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.started.done():
            self.started.set_exception(ConnectionError(
                f"the engine closed the exec connection: {exc or 'EOF before upgrade'}"))
        self.stdout.end()
        self.stderr.end()
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)
        if not self.ended.done():
            self.ended.set_result(None)

    def pause_writing(self) -> None:
        if self._write_paused is None or self._write_paused.done():
            self._write_paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)

    # --- parsing ----------------------------------------------------------------------
    def _read_head(self) -> bool:
        """Consumes the HTTP response head; True once upgraded (the rest is the stream)."""
        end = self._buffer.find(b"\r\n\r\n", 0, self._filled)
        if end < 0:
            if self._filled >= MAX_HEAD:
                self._fail(ConnectionError("the engine's response head is too large"))
            return False
        status, headers = parse_head(bytes(self._buffer[:end]))
        if status not in (101, 200):
            body = bytes(self._buffer[end + 4:self._filled])
            length = headers.get("content-length", "")
            if length.isdigit() and len(body) < int(length) and self._filled < MAX_HEAD:
                return False  # the rest of the error's text is on its way
            self._fail(EngineError(status, error_message(body) or f"HTTP {status}"))
            return False
        rest = self._filled - end - 4
        self._buffer[:rest] = self._buffer[end + 4:self._filled]
        self._filled = rest
        self._upgraded = True
        self.started.set_result(None)
        return True

    def _demux(self) -> None:
        buffer, view, end, pos = self._buffer, self._view, self._filled, 0
        while pos < end:
            if self._frame_left == 0:
                if end - pos < HEADER.size:
                    break
                self._frame_stream, self._frame_left = HEADER.unpack_from(buffer, pos)
                pos += HEADER.size
                continue
            take = min(self._frame_left, end - pos)
            output = self._outputs.get(self._frame_stream)
            if output is not None:  # unknown stream ids are dropped, never fatal
                output.feed(view[pos:pos + take])
            pos += take
            self._frame_left -= take
        left = end - pos  # a header cut by the read: at most 7 bytes move to the front
        if left:
            buffer[:left] = buffer[pos:end]
        self._filled = left

    def _fail(self, exc: Exception) -> None:
        if not self.started.done():
            self.started.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    # --- flow control -----------------------------------------------------------------
    def _pause_if_full(self) -> None:
        if not self._paused and (self.stdout.size > HIGH_WATER
                                 or self.stderr.size > HIGH_WATER):
            self._paused = True
            self.transport.pause_reading()

    def consumed(self) -> None:
        if self._paused and self.stdout.size < LOW_WATER \
                and self.stderr.size < LOW_WATER and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()

    # --- stdin ------------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # the command is gone; what it did not read is lost, as with ssh
        self.transport.write(data)
        if self._write_paused is not None and not self._write_paused.done():
            await self._write_paused

    def write_eof(self) -> None:
        """Half-close: the engine closes the command's stdin, output keeps coming."""
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.write_eof()
            except (OSError, RuntimeError):
                pass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def start_exec(api: EngineAPI, exec_id: str, tty: bool) -> ExecStream:
    """`exec start` on a fresh connection, upgraded into the exec's stream."""
    _, stream = await api.connect(lambda: ExecStream(tty))
    stream.transport.write(api.request_bytes(
        "POST", f"/exec/{exec_id}/start", {"Detach": False, "Tty": tty},
        headers={"Connection": "Upgrade", "Upgrade": "tcp"}))
    try:
        async with asyncio.timeout(CALL_TIMEOUT):
            await stream.started
    except BaseException:
        stream.close()
        raise
    return stream
