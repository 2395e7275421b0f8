"""Unit tests of the pieces that need no network: codec, flow control, parsing, stubs."""

from __future__ import annotations

import asyncio
import filecmp

import msgpack
import pytest
from rune.cli.parsing import mark_command_start, parse_duration, parse_env

from rune import frames
from rune.flow import Receiver, Sender


def test_frame_roundtrip():
    """A frame decodes to what was encoded."""
    data = frames.encode(frames.STDOUT, 7, b"\x00\xffhello")
    assert frames.decode(data) == (frames.STDOUT, 7, b"\x00\xffhello")


@pytest.mark.parametrize("garbage", [
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"a": 1}),
    msgpack.packb([99, 1, b""]), msgpack.packb([frames.STDOUT, -1, b""]),
    msgpack.packb([frames.STDOUT, 1, "text not bytes"]), b"\x00" * (frames.MAX_FRAME + 1),
])
def test_malformed_frames_raise_one_error(garbage):
    """Every kind of garbage is a MalformedFrame, never another exception."""
    with pytest.raises(frames.MalformedFrame):
        frames.decode(garbage)


class Wire:
    """A fake transport: records what the sender publishes, may drop frames."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.drop: set[int] = set()

    async def publish(self, data: bytes) -> None:
        seq = frames.decode(data)[1]
        if seq in self.drop:
            self.drop.discard(seq)
            return
        self.sent.append(data)


async def test_sender_waits_for_credit():
    """With the window full, a data frame waits until the receiver consumes."""
    wire = Wire()
    sender = Sender(wire.publish, window=100)
    await sender.send(frames.STDOUT, b"x" * 60, 60)
    await sender.send(frames.STDOUT, b"x" * 40, 40)
    blocked = asyncio.create_task(sender.send(frames.STDOUT, b"x" * 10, 10))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    await sender.on_ack(1, 2)
    await asyncio.wait_for(blocked, 1)
    assert sender.unacked_bytes == 50


async def test_gap_is_repaired_without_loss_or_duplicates():
    """A dropped frame is retransmitted on the gap ack; the receiver delivers each once."""
    wire = Wire()
    wire.drop = {2}
    sender = Sender(wire.publish, window=1 << 20, rto=0.05)
    receiver = Receiver(window=1 << 20)
    delivered: list[bytes] = []

    async def deliver() -> None:
        pending, wire.sent = wire.sent, []
        for data in pending:
            _, seq, payload = frames.decode(data)
            verdict = receiver.accept(seq)
            if verdict:
                delivered.append(payload)
                receiver.mark_consumed(seq, len(payload))
            elif verdict is None:
                ack = receiver.ack_payload()
                await sender.on_ack(*ack)

    for i in range(5):
        await sender.send(frames.STDOUT, bytes([i]), 1)
    await deliver()
    await deliver()  # the retransmission
    await deliver()
    assert delivered == [bytes([i]) for i in range(5)]


async def test_timer_retransmits_when_nothing_progresses():
    """Outstanding frames are sent again after rto with no ack progress."""
    wire = Wire()
    sender = Sender(wire.publish, window=1 << 20, rto=0.01)
    await sender.send(frames.STDOUT, b"a", 1)
    wire.sent.clear()
    await asyncio.sleep(0.02)
    await sender.tick()
    assert [frames.decode(d)[1] for d in wire.sent] == [1]
    await sender.on_ack(1, 1)
    wire.sent.clear()
    await asyncio.sleep(0.02)
    await sender.tick()
    assert wire.sent == []


def test_receiver_drops_duplicates_and_flags_gaps():
    receiver = Receiver(window=100)
    assert receiver.accept(1) is True
    assert receiver.accept(1) is False
    assert receiver.accept(3) is None
    assert receiver.accept(2) is True


@pytest.mark.parametrize("text,seconds", [("5m", 300), ("30s", 30), ("1.5h", 5400),
                                          ("250ms", 0.25), ("12", 12)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["banana", "", "5x", "-1s", "0"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_env_pairs():
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(ValueError):
        parse_env(["NOEQUALS"])


VALUED = {"-n", "--namespace", "--env", "--timeout"}


@pytest.mark.parametrize("args,expected", [
    (["api", "ls", "-la"], ["api", "--", "ls", "-la"]),
    (["-n", "prod", "api", "ls"], ["-n", "prod", "api", "--", "ls"]),
    (["api", "--no-tty", "wc", "-l"], ["api", "--no-tty", "--", "wc", "-l"]),
    (["--timeout=5s", "api", "sh", "-c", "x", "--verbose"],
     ["--timeout=5s", "api", "--", "sh", "-c", "x", "--verbose"]),
    (["api", "--", "echo", "-n"], ["api", "--", "echo", "-n"]),
])
def test_command_start(args, expected):
    """Rune's options end where COMMAND begins."""
    assert mark_command_start(args, VALUED) == expected


def test_generated_stubs_are_fresh(tmp_path):
    """The committed gRPC stubs match exec.proto (regenerate: python -m rune.proto.generate)."""
    from rune.proto import generate

    generate.generate(tmp_path)
    for name in ("exec_pb2.py", "exec_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / name, generate.HERE / name, shallow=False), \
            f"{name} is stale: run python -m rune.proto.generate"
