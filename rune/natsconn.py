"""Connecting to NATS the same way in every program: nkeys credentials, endless reconnects."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import nats
import nats.aio.client
from nats.aio.client import Client as NATS
from nats.protocol.parser import Parser

from rune.natsread import DirectTransport, Message

log = logging.getLogger(__name__)
# nats-py reads the socket 32 KiB at a time and copies its buffer on every read, so a
# ~1 MiB frame costs dozens of reads and copies; it has no option for this, only the
# module constant (read at connect and on every read). 1 MiB: one frame, one read.
READ_BUFFER = 1024 * 1024
_CRLF = b"\r\n"


class _SliceBuffer(bytearray):
    """A bytearray whose slices are bytes: nats-py's parser takes each message out of its
    buffer as bytes(buf[a:b]), which copies twice (slice, then bytes); with this buffer
    the slice is the bytes, one copy. Indexing, searching and deleting are bytearray's."""

    def __getitem__(self, index: int | slice) -> int | bytes:
        if type(index) is slice:
            with memoryview(self) as view:  # released before the parser deletes the message
                return view[index].tobytes()
        return bytearray.__getitem__(self, index)


class _OneCopyParser(Parser):
    """nats-py's parser, also taking what rune/natsread.py's transport already split:
    messages go to the client as they are, control lines through the parser itself."""

    def reset(self) -> None:
        super().reset()
        self.buf = _SliceBuffer()

    async def parse(self, data: bytes | list = b"") -> None:
        if type(data) is not list:
            await super().parse(data)  # the stream path (after a TLS upgrade)
            return
        nc = self.nc
        for unit in data:
            if type(unit) is not Message:
                await super().parse(unit)
                continue
            sid, subject, reply, payload, headers = unit
            if type(payload) is bytearray and not getattr(nc._subs.get(sid), FRAMES, False):
                payload = bytes(payload)  # only subscribe_frames() subscribers take these
            await nc._process_msg(sid, subject, reply, payload, headers)


FRAMES = "_rune_frames"  # set on a subscription whose callback takes bytearray payloads


async def subscribe_frames(nc: NATS, subject: str, **options: object) -> object:
    """nc.subscribe(), for a callback that takes any bytes-like payload: a big message
    then comes as the bytearray the transport read it into (rune/natsread.py), uncopied.
    Every other subscription gets bytes, as nats-py gives them."""
    sub = await nc.subscribe(subject, **options)
    setattr(sub, FRAMES, True)
    return sub


def _client(servers: list[str]) -> NATS:
    nc = NATS()
    if isinstance(getattr(nc, "_ps", None), Parser) and hasattr(nc._ps, "buf"):
        nc._ps = _OneCopyParser(nc)
        # Our transport for TCP (not WebSocket): nats-py keeps a transport it was given
        # (it makes one only when it has none) and reconnects through it.
        if getattr(nc, "_transport", False) is None and not any(
                s.split("://", 1)[0] in ("ws", "wss") for s in servers if "://" in s):
            nc._transport = DirectTransport()
    return nc


def _queues_commands(nc: NATS) -> bool:
    """True when this nats-py client keeps outgoing commands as a list of buffers that its
    flusher hands to the transport's writelines (so far every 2.x release)."""
    return (isinstance(getattr(nc, "_pending", None), list)
            and isinstance(getattr(nc, "_pending_data_size", None), int)
            and getattr(nc, "_flush_queue", None) is not None
            and hasattr(nc, "_flush_pending"))


def _plain_subject(subject: str) -> bool:
    return bool(subject) and not any(c in subject for c in " \t\r\n")


async def publish_parts(nc: NATS, subject: str, parts: Sequence[bytes]) -> None:
    """Publishes the concatenation of PARTS as one message, without concatenating them.

    nats-py's publish() builds `PUB … \\r\\n` + payload + `\\r\\n` as one new bytes
    object: two copies of every payload, the largest per-byte cost of sending a 1 MiB
    frame. Here the command line, the parts and the CRLF are queued as separate buffers
    for the same flusher, which writes them with one writelines (writev): the payload is
    not copied before the kernel's own copy. Anything unusual (not connected, closing,
    too large, a client without that queue) takes publish() itself, with its errors."""
    size = sum(map(len, parts))
    if (not _queues_commands(nc) or not nc.is_connected or nc.is_draining_pubs
            or size > nc.max_payload or not _plain_subject(subject)):
        await nc.publish(subject, b"".join(parts))
        return
    head = f"PUB {subject}  {size}\r\n".encode()
    nc._pending.append(head)
    nc._pending.extend(parts)
    nc._pending.append(_CRLF)
    nc._pending_data_size += len(head) + size + len(_CRLF)
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += size
    if 0 < nc._max_pending_size < nc._pending_data_size:
        await nc._flush_pending(force_flush=True)
    elif nc._flush_queue.empty():
        await nc._flush_pending()


async def connect(
    url: str,
    name: str,
    nkey_seed_file: str | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    inbox_prefix: str | None = None,
) -> NATS:
    async def error_cb(exc: Exception) -> None:
        log.warning("nats: %s: %s", type(exc).__name__, exc)

    async def disconnected_cb() -> None:
        log.warning("nats: disconnected from %s", url)

    async def reconnected_cb() -> None:
        log.info("nats: reconnected to %s", url)
        if on_reconnect:
            await on_reconnect()

    nats.aio.client.DEFAULT_BUFFER_SIZE = max(nats.aio.client.DEFAULT_BUFFER_SIZE, READ_BUFFER)
    options: dict = {}
    if nkey_seed_file:
        options["nkeys_seed"] = nkey_seed_file
    if inbox_prefix:
        options["inbox_prefix"] = inbox_prefix
    # A comma-separated list names several cluster nodes: reconnects go to any of them.
    servers = [u.strip() for u in url.split(",") if u.strip()]
    nc = _client(servers)
    await nc.connect(
        servers=servers,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=2,
        allow_reconnect=True,
        pending_size=16 * 1024 * 1024,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        **options,
    )
    return nc
