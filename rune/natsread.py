"""A NATS client transport that reads big message payloads straight into their buffer.

nats-py reads the socket through an asyncio StreamReader and its own parser, which copy
every payload four times before a subscriber sees it (into the reader's buffer, out as
bytes, into the parser's buffer, out as the message). Here one BufferedProtocol splits
the stream into control lines and messages as it arrives:

- a message of at least DIRECT_READ bytes gets a buffer of its own, the bytes already
  received are moved into it and the kernel writes the rest there: the payload is never
  copied in this process (a subscribe_frames() subscriber gets that bytearray);
- smaller messages and control lines are cut out of one receive area (one copy each,
  the way they arrived: several per read) as bytes.

What the client's read loop gets is a list of those units; rune/natsconn.py's parser
hands messages to the client and control lines to nats-py's own parser. The handshake's
readline() takes a control line. An upgrade to TLS falls back to nats-py's stream path.
Only what the socket delivered is queued, up to QUEUE_HIGH bytes before reading pauses.
"""

from __future__ import annotations

import asyncio
import ctypes
import ssl
from collections import deque
from typing import Any
from urllib.parse import ParseResult

from nats.aio.transport import Transport
from nats.errors import ProtocolError

AREA = 256 * 1024  # the receive area for lines and small messages
DIRECT_READ = 64 * 1024  # payloads from this size are read into their own buffer
MAX_LINE = 64 * 1024  # a control line longer than this is a protocol error
MAX_PAYLOAD = 64 * 1024 * 1024  # a message announced larger than this is one too
QUEUE_HIGH = 8 * 1024 * 1024  # received and not yet taken: reading pauses above this
_CRLF = b"\r\n"


try:  # CPython's C API: a bytearray of that size whose bytes are not cleared first
    _new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
    _new_bytearray.restype = ctypes.py_object
    _new_bytearray.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
except AttributeError:  # another interpreter: cleared ones
    _new_bytearray = None


def payload_buffer(size: int) -> bytearray:
    """A buffer for a payload that is delivered only once every byte was received into
    it: clearing it first would be one more pass over each byte."""
    return _new_bytearray(None, size) if _new_bytearray is not None else bytearray(size)


class Message(tuple):
    """(sid, subject, reply, payload, headers): a message as the client processes it."""

    __slots__ = ()


class _Reader(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.area = bytearray(AREA)
        self.start = 0  # unparsed bytes are area[start:end]
        self.end = 0
        self.direct: bytearray | None = None  # a big payload being filled in place
        self.filled = 0
        self.header: tuple[int, bytes, bytes, int, int] | None = None  # awaiting payload
        self.expect_crlf = False  # a direct payload's CRLF comes through the area
        self.held: Message | None = None  # that payload's message, until its CRLF
        self.units: deque[bytes | Message] = deque()
        self.queued = 0
        self.paused = False
        self.error: Exception | None = None
        self.eof = False
        self.ready: asyncio.Future | None = None
        self.writable: asyncio.Future | None = None
        self.writing_paused = False
        self.closed = asyncio.get_running_loop().create_future()

    # --- asyncio's side ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.direct is not None:
            return memoryview(self.direct)[self.filled:]
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.area) - self.end < DIRECT_READ:
            self._compact()
        return memoryview(self.area)[self.end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.direct is not None:
            self.filled += nbytes
            if self.filled == len(self.direct):
                self._finish_direct()
            return
        self.end += nbytes
        try:
            self._scan()
        except ProtocolError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None and self.error is None:
            self.error = exc
        self._wake()
        if self.writable is not None and not self.writable.done():
            self.writable.set_exception(exc or ConnectionResetError("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    # --- splitting the stream ------------------------------------------------------------

    def _compact(self) -> None:
        """Moves the unparsed bytes to the front, into a bigger area if they need one."""
        pending = self.end - self.start
        wanted = pending + DIRECT_READ
        if self.header is not None:
            wanted = max(wanted, self.header[4] + len(_CRLF) + DIRECT_READ)
        # A new area rather than a resize: the previous one may still be exported.
        area = bytearray(max(AREA, wanted)) if wanted > len(self.area) else self.area
        area[:pending] = self.area[self.start:self.end]  # a copy first: the two may overlap
        self.area, self.start, self.end = area, 0, pending

    def _scan(self) -> None:
        area = self.area
        while self.start < self.end:
            if self.expect_crlf:
                if self.end - self.start < len(_CRLF):
                    return
                if area[self.start:self.start + 2] != _CRLF:
                    raise ProtocolError("nats: message payload not followed by CRLF")
                self.start += 2
                self.expect_crlf = False
                held, self.held = self.held, None
                self._queue(held)  # type: ignore[arg-type]
                continue
            if self.header is not None:
                if not self._take_payload():
                    return
                continue
            cut = area.find(_CRLF, self.start, self.end)
            if cut < 0:
                if self.end - self.start > MAX_LINE:
                    raise ProtocolError("nats: control line too long")
                return
            line = bytes(area[self.start:cut + 2])
            self.start = cut + 2
            if line.startswith((b"MSG ", b"MSG\t", b"HMSG ", b"HMSG\t")):
                self.header = _message_header(line)
            else:
                self._queue(line)

    def _take_payload(self) -> bool:
        """The payload announced by self.header, from the area or into its own buffer."""
        sid, subject, reply, head_size, size = self.header  # type: ignore[misc]
        have = self.end - self.start
        if size < DIRECT_READ and have >= size + len(_CRLF):
            at = self.start
            if self.area[at + size:at + size + 2] != _CRLF:
                raise ProtocolError("nats: message payload not followed by CRLF")
            payload = bytes(self.area[at:at + size])
            self.start = at + size + 2
            self.header = None
            self._queue(self._message(sid, subject, reply, head_size, payload))
            return True
        if size >= DIRECT_READ:
            direct = payload_buffer(size)
            taken = min(have, size)
            with memoryview(self.area) as view:
                direct[:taken] = view[self.start:self.start + taken]
            self.start += taken
            self.direct, self.filled = direct, taken
            if taken == size:
                self._finish_direct()
            return False
        if len(self.area) - self.start < size + len(_CRLF):
            self._compact()
        return False

    def _finish_direct(self) -> None:
        sid, subject, reply, head_size, _ = self.header  # type: ignore[misc]
        payload, self.direct, self.header, self.filled = self.direct, None, None, 0
        self.expect_crlf = True  # held until its CRLF is seen, as any other message
        self.held = self._message(sid, subject, reply, head_size, payload)  # type: ignore
        try:
            self._scan()  # what followed the payload in the area, if anything
        except ProtocolError as exc:
            self._fail(exc)

    @staticmethod
    def _message(sid: int, subject: bytes, reply: bytes, head_size: int,
                 payload: bytes | bytearray) -> Message:
        if head_size:
            return Message((sid, subject, reply, payload[head_size:],
                            bytes(payload[:head_size])))
        return Message((sid, subject, reply, payload, None))

    def _queue(self, unit: bytes | Message) -> None:
        self.units.append(unit)
        self.queued += _size(unit)
        if self.queued > QUEUE_HIGH and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(None)

    # --- the client's side ---------------------------------------------------------------

    async def _wait(self) -> None:
        while not self.units and self.error is None and not self.eof:
            self.ready = asyncio.get_running_loop().create_future()
            await self.ready
        if self.error is not None and not self.units:
            raise self.error

    async def take_all(self) -> list[bytes | Message]:
        await self._wait()
        units = list(self.units)
        self.units.clear()
        self._taken(self.queued)
        return units

    async def take_line(self) -> bytes:
        await self._wait()
        if not self.units:
            return b""
        unit = self.units.popleft()
        if isinstance(unit, Message):
            raise ProtocolError("nats: a message before the handshake ended")
        self._taken(_size(unit))
        return unit

    def _taken(self, size: int) -> None:
        self.queued -= size
        if self.paused and self.queued <= QUEUE_HIGH // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()


def _size(unit: bytes | Message) -> int:
    """The bytes a unit holds: a line's, or a message's payload and headers."""
    if isinstance(unit, Message):
        return len(unit[3]) + len(unit[4] or b"")
    return len(unit)


def _message_header(line: bytes) -> tuple[int, bytes, bytes, int, int]:
    """MSG subject sid [reply] size / HMSG subject sid [reply] header-size total-size."""
    words = line.split()
    headed = words[0] == b"HMSG"
    args = words[1:]
    sizes = 2 if headed else 1
    if len(args) not in (2 + sizes, 3 + sizes):
        raise ProtocolError("nats: malformed MSG")
    try:
        sid = int(args[1])
        numbers = [int(x) for x in args[-sizes:]]
    except ValueError:
        raise ProtocolError("nats: malformed MSG") from None
    reply = args[2] if len(args) == 3 + sizes else b""
    head_size, size = (numbers[0], numbers[1]) if headed else (0, numbers[0])
    if not 0 <= head_size <= size <= MAX_PAYLOAD:
        raise ProtocolError("nats: malformed MSG")
    return sid, args[0], reply, head_size, size


class DirectTransport(Transport):
    """nats-py's Transport over _Reader; after a TLS upgrade, over asyncio streams."""

    def __init__(self) -> None:
        self._reader: _Reader | None = None
        self._transport: asyncio.Transport | None = None
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def connect(self, uri: ParseResult, buffer_size: int, connect_timeout: int) -> None:
        loop = asyncio.get_running_loop()
        self._streams = None
        transport, reader = await asyncio.wait_for(
            loop.create_connection(_Reader, host=uri.hostname, port=uri.port),
            connect_timeout)
        self._transport, self._reader = transport, reader

    async def connect_tls(self, uri: str | ParseResult, ssl_context: ssl.SSLContext,
                          buffer_size: int, connect_timeout: int) -> None:
        loop = asyncio.get_running_loop()
        hostname = uri if isinstance(uri, str) else uri.hostname
        stream = asyncio.StreamReader(limit=buffer_size)
        protocol = asyncio.StreamReaderProtocol(stream)
        if self._transport is None:
            if isinstance(uri, str):
                raise ProtocolError("nats: a TLS connection needs a URL")
            transport, _ = await asyncio.wait_for(loop.create_connection(
                lambda: protocol, host=uri.hostname, port=uri.port, ssl=ssl_context,
                server_hostname=hostname), connect_timeout)
        else:
            if self._reader is not None and self._reader.units:
                raise ProtocolError("nats: data before the TLS handshake")
            transport = await asyncio.wait_for(loop.start_tls(
                self._transport, protocol, ssl_context, server_hostname=hostname),
                connect_timeout)
        self._transport = transport  # type: ignore[assignment]
        self._streams = (stream, asyncio.StreamWriter(transport, protocol, stream, loop))

    def write(self, payload: bytes) -> None:
        if self._streams is not None:
            self._streams[1].write(payload)
        elif self._transport is not None:
            self._transport.write(payload)

    def writelines(self, payload: list[bytes]) -> None:
        if self._streams is not None:
            self._streams[1].writelines(payload)
        elif self._transport is not None:
            self._transport.writelines(payload)

    async def read(self, buffer_size: int) -> Any:
        if self._streams is not None:
            return await self._streams[0].read(buffer_size)
        assert self._reader is not None, "connect must be called first"
        return await self._reader.take_all()

    async def readline(self) -> bytes:
        if self._streams is not None:
            return await self._streams[0].readline()
        assert self._reader is not None, "connect must be called first"
        return await self._reader.take_line()

    async def drain(self) -> None:
        if self._streams is not None:
            await self._streams[1].drain()
            return
        reader = self._reader
        if reader is None:
            return
        if reader.error is not None and reader.eof:
            raise ConnectionResetError("connection lost")
        while reader.writing_paused:
            reader.writable = asyncio.get_running_loop().create_future()
            await reader.writable

    async def wait_closed(self) -> None:
        if self._streams is not None:
            await self._streams[1].wait_closed()
        elif self._reader is not None:
            await self._reader.closed

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def at_eof(self) -> bool:
        if self._streams is not None:
            return self._streams[0].at_eof()
        return self._reader is None or (self._reader.eof and not self._reader.units)

    def __bool__(self) -> bool:
        # Always usable: connect() (re)opens it. nats-py makes a transport of its own
        # only where it has none that is true.
        return True
