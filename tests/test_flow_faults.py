"""Session links under faults, on a fake bus: lost acks, silence, disconnects, garbage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgpack
import pytest

from rune import frames
from rune.errors import Unavailable
from rune.link import LinkSettings, SessionLink


class FakeBus:
    """Routes publishes to subscribers by exact subject; can drop frames or 'disconnect'."""

    def __init__(self) -> None:
        self.subs: dict[str, Callable] = {}
        self.is_connected = True
        self.drop: Callable[[str, bytes], bool] = lambda subject, data: False

    async def subscribe(self, subject: str, cb: Callable, **_: object) -> FakeBus:
        self.subs[subject] = cb
        return self

    async def unsubscribe(self) -> None:
        pass

    async def publish(self, subject: str, data: bytes) -> None:
        if not self.is_connected or self.drop(subject, data):
            return
        cb = self.subs.get(subject)
        if cb:
            asyncio.get_running_loop().call_soon(
                asyncio.ensure_future, cb(type("Msg", (), {"data": data, "subject": subject})))


def pair(bus: FakeBus, settings: LinkSettings) -> tuple[SessionLink, SessionLink]:
    agent = SessionLink(bus, "out", "in", frozenset((frames.STDIN,)), settings, "apiserver")
    server = SessionLink(bus, "in", "out", frozenset((frames.STDOUT, frames.EXIT)),
                         settings, "agent a1")
    return agent, server


async def until(check: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_lost_acks_are_repaired_by_duplicates():
    """Acks lost on the way back: the retransmitted frames make the receiver ack again."""
    bus = FakeBus()
    agent, server = pair(bus, LinkSettings(window=1000, heartbeat=30, rto=0.1))
    await agent.open()
    await server.open()
    dropping = {"on": True}
    bus.drop = lambda subject, data: subject == "in" and dropping["on"] \
        and frames.decode(data)[0] == frames.ACK
    await agent.send(frames.STDOUT, b"x" * 600, 600)
    kind, payload = await server.recv()
    await server.flush_ack()  # lost
    dropping["on"] = False
    await until(agent.sender.all_consumed, 2)
    assert server.receiver.duplicates >= 1
    await agent.close()
    await server.close()


async def test_silent_peer_is_lost_after_the_intervals():
    """A peer that says nothing is lost after heartbeat x lost_after, with its name."""
    bus = FakeBus()
    link = SessionLink(bus, "a", "b", frozenset(), LinkSettings(heartbeat=0.05, lost_after=3),
                       "agent a9")
    await link.open()
    took = await until(lambda: link.lost is not None, 2)
    assert 0.14 <= took <= 0.5
    assert str(link.lost).startswith("agent a9 lost: no heartbeat for")
    with pytest.raises(Unavailable):
        await link.recv()
    await link.close()


async def test_heartbeats_keep_an_idle_pair_alive():
    """Two idle ends beat each other: neither is lost after many intervals."""
    bus = FakeBus()
    agent, server = pair(bus, LinkSettings(heartbeat=0.05, lost_after=3))
    await agent.open()
    await server.open()
    await asyncio.sleep(0.6)
    assert agent.lost is None and server.lost is None
    await agent.close()
    await server.close()


async def test_own_disconnect_is_not_the_peers_death():
    """While our connection is down, silence is not loss; past the grace it is the broker."""
    bus = FakeBus()
    settings = LinkSettings(heartbeat=0.05, lost_after=3, reconnect_grace=0.5)
    agent, server = pair(bus, settings)
    await agent.open()
    await server.open()
    bus.is_connected = False
    await asyncio.sleep(0.3)  # six times the loss bound
    assert agent.lost is None and server.lost is None
    bus.is_connected = True
    await asyncio.sleep(0.3)
    assert agent.lost is None and server.lost is None
    bus.is_connected = False
    await until(lambda: server.lost is not None, 2)
    assert str(server.lost).startswith("broker unavailable")
    await agent.close()
    await server.close()


async def test_garbage_never_reaches_the_stream():
    """Malformed, unknown, oversized, stale and unexpected frames are dropped quietly."""
    bus = FakeBus()
    agent, server = pair(bus, LinkSettings(heartbeat=30))
    await agent.open()
    await server.open()
    await agent.send(frames.STDOUT, b"one", 3)
    assert await server.recv() == (frames.STDOUT, b"one")
    for data in (b"\xc1", msgpack.packb([99, 2, b"x"]), msgpack.packb({"k": 1}),
                 frames.encode(frames.STDOUT, 1, b"stale"),
                 frames.encode(frames.STDOUT, 2, b"y" * (frames.MAX_DATA + 1)),
                 frames.encode(frames.STDIN, 2, b"wrong direction"),
                 frames.encode(frames.ACK, 0, {"not": "a list"}),
                 frames.encode(frames.STDOUT, 10**12, b"far future")):
        await server._on_msg(type("Msg", (), {"data": data}))
    await agent.send(frames.STDOUT, b"two", 3)
    assert await server.recv() == (frames.STDOUT, b"two")
    assert not server._queue
    await agent.close()
    await server.close()


def test_oversized_data_frame_is_malformed():
    """A data frame above MAX_DATA is rejected by the codec."""
    with pytest.raises(frames.MalformedFrame):
        frames.decode(frames.encode(frames.STDOUT, 1, b"z" * (frames.MAX_DATA + 1)))


@pytest.mark.parametrize("gone", [True, False])
async def test_probe_shortens_the_wait_only_for_a_peer_that_left(gone):
    """A peer the broker says is gone is lost after two intervals; otherwise after all."""
    bus = FakeBus()
    probes = []

    async def probe() -> bool:
        probes.append(time.monotonic())
        return gone

    link = SessionLink(bus, "a", "b", frozenset(), LinkSettings(heartbeat=0.1, lost_after=5),
                       "agent a9", probe=probe)
    await link.open()
    took = await until(lambda: link.lost is not None, 3)
    assert probes
    if gone:
        assert 0.2 <= took < 0.4
        assert "no longer connected to the broker" in str(link.lost)
    else:
        assert took >= 0.5
        assert "no longer connected" not in str(link.lost)
    await link.close()


async def test_own_stall_is_not_the_peers_silence():
    """Our event loop starved for many intervals: the peer is not lost for it."""
    bus = FakeBus()
    agent, server = pair(bus, LinkSettings(heartbeat=0.05, lost_after=3))
    await agent.open()
    await server.open()
    await asyncio.sleep(0.1)
    time.sleep(0.5)  # blocks the loop: ten times the loss bound
    await asyncio.sleep(0.06)
    assert agent.lost is None and server.lost is None
    await agent.close()
    await server.close()


async def test_a_closed_pair_is_freed_without_the_cycle_collector():
    """A link and its sender hold each other while open; once closed they are freed by
    reference counting alone (a fan-out ends thousands of sessions at once, and each one
    left to the collector made every collection longer)."""
    import gc
    import weakref

    bus = FakeBus()
    agent, server = pair(bus, LinkSettings(heartbeat=60, lost_after=120))
    await agent.open()
    await server.open()
    await agent.send(frames.STDOUT, b"x", 1)
    receiver = server.receiver
    await until(lambda: receiver.received == 1, 5)
    await agent.close()
    await server.close()
    await asyncio.sleep(0.05)  # their cancelled tasks finish
    refs = [weakref.ref(agent), weakref.ref(server), weakref.ref(agent.sender)]
    gc.disable()
    try:
        del agent, server
        bus.subs.clear()
        assert [ref() for ref in refs] == [None, None, None]
    finally:
        gc.enable()
