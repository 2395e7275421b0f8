"""The bulk output path: data frames as header + payload, zero-copy publishes, pipe sizes."""

from __future__ import annotations

import asyncio
import fcntl
import os

import msgpack
import pytest
from nats.errors import BadSubjectError
from rune.agent.runners.process import DEFAULT_PIPE, MAX_PIPE, _grow_pipe, pipe_size
from rune.cli.devstack import Stack, free_port

from rune import frames
from rune.flow import Sender
from rune.natsconn import _queues_commands, _SliceBuffer, connect, publish_parts

SIZES = [0, 1, 255, 256, 65535, 65536, frames.MAX_DATA]
SEQS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**40]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("seq", SEQS)
def test_data_header_is_the_msgpack_frame(seq, size):
    """Header + payload are byte for byte what encode() writes, and decode back."""
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    joined = frames.data_header(frames.STDOUT, seq, size) + payload
    assert joined == frames.encode(frames.STDOUT, seq, payload)
    assert frames.decode(joined) == (frames.STDOUT, seq, payload)


def _bin(size: int) -> bytes:
    return b"\xc6" + size.to_bytes(4, "big")


@pytest.mark.parametrize("garbage", [
    b"\x93\x01\x01" + _bin(10) + b"short",                  # payload cut short
    b"\x93\x01\x01" + _bin(2) + b"abc",                     # a trailing byte
    b"\x93\x01\x01\xc4",                                    # header cut short
    b"\x93\x01\xcd\x01",                                    # sequence cut short
    b"\x93\x01\xd0\xff" + _bin(1) + b"a",                   # negative sequence (int8)
    b"\x93\x01\x01" + _bin(frames.MAX_DATA + 1) + b"y" * (frames.MAX_DATA + 1),
    b"\x93\x63\x01" + _bin(1) + b"a",                       # unknown kind
    b"\x93\x01\x01\xa1a",                                   # a str payload
    msgpack.packb([frames.STDOUT, 1, b"a"]) + b"\xc0",      # trailing nil
])
def test_hostile_data_frames_are_refused(garbage):
    """What looks like a data frame but is not exactly one is a MalformedFrame."""
    with pytest.raises(frames.MalformedFrame):
        frames.decode(garbage)


async def test_sender_keeps_parts_and_retransmits_them():
    """Data frames leave as (header, payload), control frames as bytes; a retransmission
    sends the very same parts again."""
    parts: list[tuple[bytes, bytes]] = []
    whole: list[bytes] = []

    async def publish(data: bytes) -> None:
        whole.append(data)

    async def publish_split(frame: tuple[bytes, bytes]) -> None:
        parts.append(frame)

    sender = Sender(publish, window=1 << 20, rto=0.01, publish_parts=publish_split)
    payload = b"p" * 1000
    await sender.send(frames.STDOUT, payload, len(payload))
    await sender.send(frames.EXIT, {"code": 0, "signal": 0})
    assert parts[0][1] is payload  # not copied
    assert frames.decode(b"".join(parts[0])) == (frames.STDOUT, 1, payload)
    assert frames.decode(whole[0])[:2] == (frames.EXIT, 2)
    await sender.retransmit(min_interval=0)
    assert parts[1] == parts[0] and frames.decode(whole[1])[:2] == (frames.EXIT, 2)


def test_pipe_size_follows_the_window():
    """An exec's 4 MiB window gets a 1 MiB pipe; a fan-out member's keeps the default."""
    assert pipe_size(4 << 20) == MAX_PIPE
    assert pipe_size(256 << 10) == DEFAULT_PIPE
    assert pipe_size(1024) == DEFAULT_PIPE
    read_end, write_end = os.pipe()
    try:
        _grow_pipe(read_end, pipe_size(4 << 20))
        assert fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ) >= min(
            MAX_PIPE, int(open("/proc/sys/fs/pipe-max-size").read()))
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.fixture
def nats_url(tmp_path):
    stack = Stack(tmp_path, nats_port=free_port(), api_port=free_port())
    stack.start_nats()
    yield stack.nats_url
    stack.stop()


async def test_publish_parts_delivers_whole_messages_in_order(nats_url):
    """Over the real broker: each message is its parts joined, in order, and the installed
    nats-py takes the no-copy path."""
    nc = await connect(nats_url, "parts-test")  # its parser, too
    got: list[bytes] = []
    done = asyncio.Event()

    async def on_msg(msg: object) -> None:
        got.append(msg.data)
        if len(got) == 50:
            done.set()

    await nc.subscribe("parts.test", cb=on_msg)
    await nc.flush()
    assert _queues_commands(nc)
    sent = []
    for i in range(50):
        head, body = bytes([i]) * 7, os.urandom(i * 20_000)
        sent.append(head + body)
        await publish_parts(nc, "parts.test", (head, body))
    await asyncio.wait_for(done.wait(), 10)
    assert got == sent
    with pytest.raises(BadSubjectError):  # refused as publish() refuses it
        await publish_parts(nc, "bad subject", (b"a", b"b"))
    await nc.close()


def test_slice_buffer_slices_are_bytes():
    """The parser's buffer: slices come out as bytes, the buffer stays a bytearray."""
    buf = _SliceBuffer(b"MSG a 1 3\r\nabc\r\n")
    assert buf[11:14] == b"abc" and type(buf[11:14]) is bytes and buf[0] == ord("M")
    del buf[:16]
    assert buf == bytearray(b"") and isinstance(buf, bytearray)
