"""One end of a session over NATS: a reliable sender, a reliable receiver, heartbeats.

Frames arrive through a subscription callback that never blocks: it drops
garbage, duplicates and gaps, and queues in-order frames. The queue is bounded
by the peer's window, because the peer sends only against credit, and credit is
returned only when the consumer takes the *next* frame with `recv()`.

A link subscribes to its own subject and runs its own timer, unless it is given a
LinkHub: then one wildcard subscription per peer (`rune.out.<agent>.*` on the apiserver,
`rune.in.<agent>.*` on an agent) routes frames to the links by subject, and one timer
ticks every link of the hub, so that 1,000 sessions are not 1,000 subscriptions (each a
SUB, an UNSUB and a task in the client) and 1,000 timers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS

from rune import frames
from rune.errors import Unavailable
from rune.flow import Receiver, Sender
from rune.natsconn import publish_parts, subscribe_frames
from rune.ratelog import RateLimitedLog

log = logging.getLogger(__name__)
garbage_log = RateLimitedLog(log)

DEFAULT_WINDOW = 4 * 1024 * 1024
TICK = 0.05


class LinkSettings:
    def __init__(
        self,
        window: int = DEFAULT_WINDOW,
        heartbeat: float = 2.0,
        lost_after: int = 3,
        rto: float = 1.0,
        reconnect_grace: float = 30.0,
    ) -> None:
        self.window = window
        self.heartbeat = heartbeat
        self.lost_after = lost_after
        self.rto = rto
        # While our own broker connection is down the peer cannot be heard, which says
        # nothing about the peer: allow this long for the reconnect before giving up.
        self.reconnect_grace = reconnect_grace


class SessionLink:
    def __init__(
        self,
        nc: NATS,
        send_subject: str,
        recv_subject: str,
        accepts: frozenset[int],
        settings: LinkSettings | None = None,
        peer: str = "peer",
        probe: Callable[[], Awaitable[bool]] | None = None,
        hub: LinkHub | None = None,
        hub_subject: str = "",
    ) -> None:
        self.nc = nc
        # With a hub: the wildcard subscription (covering recv_subject) that routes to us.
        self._hub = hub
        self._hub_subject = hub_subject
        self.settings = settings or LinkSettings()
        self.send_subject = send_subject
        self.recv_subject = recv_subject
        self.peer = peer
        # Asks the broker whether the peer is still connected (True: it is gone for sure),
        # so a peer that died is lost after two silent intervals instead of lost_after.
        self._probe = probe
        self._probing: asyncio.Task | None = None
        self._last_probe = 0.0
        self._connected_since = float("-inf")  # set by a reconnect only
        self._accepts = accepts
        self.sender = Sender(self._publish, self.settings.window, self.settings.rto,
                             publish_parts=self._publish_parts)
        self.receiver = Receiver(self.settings.window)
        self._queue: deque[tuple[int, int, Any]] = deque()
        self._ready = asyncio.Event()
        self._to_consume: tuple[int, int] | None = None
        self._sub = None
        self._task: asyncio.Task | None = None
        self._last_sent = time.monotonic()
        self._last_heard = time.monotonic()
        self._last_ack = 0.0
        self._last_dup_ack = 0.0
        self._last_tick = time.monotonic()
        self._disconnected_since: float | None = None
        self.lost: Unavailable | None = None
        self.lost_event = asyncio.Event()
        self.bytes_in = 0
        self.bytes_out = 0

    async def open(self) -> None:
        if self._hub is not None:
            await self._hub.attach(self, self._hub_subject)
            return
        self._sub = await subscribe_frames(
            self.nc, self.recv_subject, cb=self._on_msg, pending_bytes_limit=256 * 1024 * 1024
        )
        self._task = asyncio.create_task(self._maintain())

    async def close(self) -> None:
        if self._probing:
            self._probing.cancel()
        if self._hub is not None:
            hub, self._hub = self._hub, None
            await hub.detach(self, self._hub_subject)
        if self._task:
            self._task.cancel()
            self._task = None
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may be closed or reconnecting
                pass
        self.sender.detach()

    async def _publish(self, data: bytes) -> None:
        self._last_sent = time.monotonic()
        try:
            await self.nc.publish(self.send_subject, data)
        except Exception as exc:
            # Lost frames are retransmitted once the broker is back; acks are re-sent on tick.
            garbage_log.warning("publish", "publish on %s failed: %s", self.send_subject, exc)

    async def _publish_parts(self, parts: tuple[bytes, bytes]) -> None:
        self._last_sent = time.monotonic()
        try:
            await publish_parts(self.nc, self.send_subject, parts)
        except Exception as exc:
            garbage_log.warning("publish", "publish on %s failed: %s", self.send_subject, exc)

    async def send(self, kind: int, payload: Any = None, size: int = 0) -> None:
        if size:
            self.bytes_out += size
        await self.sender.send(kind, payload, size)

    async def _on_msg(self, msg: Any) -> None:
        try:
            await self._handle(msg.data)
        except Exception as exc:  # garbage must never take the session down
            garbage_log.warning("handler", "dropped frame on %s: %s: %s", self.recv_subject,
                                type(exc).__name__, exc)

    async def _handle(self, data: bytes) -> None:
        try:
            kind, seq, payload = frames.decode(data)
        except frames.MalformedFrame as exc:
            garbage_log.warning("malformed", "dropped frame on %s: %s", self.recv_subject, exc)
            return
        self._last_heard = time.monotonic()
        if kind in (frames.ACK, frames.HEARTBEAT):
            if (isinstance(payload, list) and len(payload) == 2
                    and all(isinstance(x, int) for x in payload)):
                await self.sender.on_ack(payload[0], payload[1])
            return
        if kind not in self._accepts:
            garbage_log.warning("kind", "dropped %s frame on %s", frames.NAMES[kind],
                                self.recv_subject)
            return
        accepted = self.receiver.accept(seq)
        if accepted:
            self._queue.append((seq, kind, payload))
            self._ready.set()
        elif accepted is None:
            await self._ack()
        else:
            garbage_log.warning("duplicate", "dropped duplicate or stale %s frame %d on %s",
                                frames.NAMES[kind], seq, self.recv_subject)
            # A retransmitted frame means the peer missed our ack: repeat it (at most every
            # TICK, so a burst of duplicates costs one ack).
            now = time.monotonic()
            if now - self._last_dup_ack >= TICK:
                self._last_dup_ack = now
                await self._ack()

    async def recv(self) -> tuple[int, Any]:
        """The next frame in order; the previous one counts as consumed. Raises when lost."""
        if self._to_consume is not None:
            seq, size = self._to_consume
            self._to_consume = None
            if self.receiver.mark_consumed(seq, size):
                await self._ack()
        while not self._queue:
            if self.lost is not None:
                raise self.lost
            self._ready.clear()
            lost = asyncio.ensure_future(self.lost_event.wait())
            ready = asyncio.ensure_future(self._ready.wait())
            try:
                await asyncio.wait((lost, ready), return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                ready.cancel()
        seq, kind, payload = self._queue.popleft()
        size = len(payload) if kind in frames.DATA_KINDS else 0
        self.bytes_in += size
        self._to_consume = (seq, size)
        return kind, payload

    def declare_lost(self, error: Unavailable) -> None:
        if self.lost is None:
            self.lost = error
            self.lost_event.set()

    async def _ack(self) -> None:
        self._last_ack = time.monotonic()
        await self._publish(frames.encode(frames.ACK, 0, self.receiver.ack_payload()))

    async def flush_ack(self) -> None:
        """Acknowledges everything taken so far (used at the end of a session)."""
        if self._to_consume is not None:
            seq, size = self._to_consume
            self._to_consume = None
            self.receiver.mark_consumed(seq, size)
        await self._ack()

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            await self.tick()

    async def tick(self) -> None:
        """Every TICK: acks and retransmissions due, heartbeats, and the peer's silence."""
        s = self.settings
        now = time.monotonic()
        stalled = now - self._last_tick - TICK
        self._last_tick = now
        if stalled > TICK:
            # Our own process was starved: the peer's frames may be waiting unread, so
            # only silence while we were running counts against it.
            self._last_heard += stalled
        if not self.nc.is_connected:
            # Frames published now only pile up in the client's buffer; and silence
            # is no sign of the peer's death until our own connection is back.
            if self._disconnected_since is None:
                self._disconnected_since = now
            elif now - self._disconnected_since > s.reconnect_grace:
                self.declare_lost(Unavailable(
                    f"broker unavailable for {now - self._disconnected_since:.1f}s"))
            return
        if self._disconnected_since is not None:
            # Back after a broker blip: restart the peer's clock, repair the gap now.
            self._disconnected_since = None
            self._connected_since = now
            self._last_heard = now
            await self._ack()
            await self.sender.retransmit(min_interval=0)
        if self.receiver.ack_due() and now - self._last_ack >= TICK:
            await self._ack()
        await self.sender.tick()
        if now - self._last_sent >= s.heartbeat or now - self._last_ack >= s.heartbeat:
            # Sent while idle, and at least every interval: a lost ack is repeated too.
            self._last_ack = now
            await self._publish(
                frames.encode(frames.HEARTBEAT, 0, [self.receiver.consumed,
                                                    self.receiver.received])
            )
        silent = now - self._last_heard
        if silent >= s.heartbeat * s.lost_after and self.lost is None:
            self.declare_lost(Unavailable(
                f"{self.peer} lost: no heartbeat for {silent:.1f}s"))
        elif self._probe_due(now, silent):
            self._last_probe = now
            self._probing = asyncio.create_task(self._run_probe(silent))

    def _probe_due(self, now: float, silent: float) -> bool:
        s = self.settings
        return (self._probe is not None and self.lost is None
                and silent >= s.heartbeat * min(2, s.lost_after)
                and now - self._last_probe >= s.heartbeat
                and (self._probing is None or self._probing.done())
                # Right after a broker restart the peer may simply not be back yet.
                and now - self._connected_since >= s.heartbeat * s.lost_after)

    async def _run_probe(self, silent: float) -> None:
        try:
            gone = await self._probe()
        except Exception:  # a failed probe proves nothing: the heartbeat rule decides
            return
        if gone and self._last_heard < self._last_probe:
            self.declare_lost(Unavailable(
                f"{self.peer} lost: no heartbeat for {silent:.1f}s and no longer connected "
                "to the broker"))


class LinkHub:
    """Shared subscriptions and one timer for many links of one NATS connection.

    A wildcard is subscribed while at least one link routes through it; a frame whose
    subject belongs to no link (a session already gone, an agent's liveness beat) is
    dropped, as a closed link's subscription would have dropped it.
    """

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._links: dict[str, SessionLink] = {}
        self._subs: dict[str, list] = {}  # wildcard -> [links using it, subscribing task]
        self._ticker: asyncio.Task | None = None

    async def attach(self, link: SessionLink, wildcard: str) -> None:
        self._links[link.recv_subject] = link
        entry = self._subs.get(wildcard)
        if entry is None:
            entry = self._subs[wildcard] = [0, asyncio.ensure_future(subscribe_frames(
                self.nc, wildcard, cb=self._on_msg, pending_msgs_limit=1 << 20,
                pending_bytes_limit=1 << 30))]
        entry[0] += 1
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick())
        try:
            await asyncio.shield(entry[1])
        except BaseException:
            await self.detach(link, wildcard)
            raise

    async def detach(self, link: SessionLink, wildcard: str) -> None:
        if self._links.get(link.recv_subject) is link:
            del self._links[link.recv_subject]
        entry = self._subs.get(wildcard)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] > 0:
            return
        del self._subs[wildcard]
        try:
            sub = await entry[1]
            await sub.unsubscribe()
        except Exception:  # never subscribed, or the connection is closed or reconnecting
            pass

    async def _on_msg(self, msg: Any) -> None:
        link = self._links.get(msg.subject)
        if link is not None:
            await link._on_msg(msg)

    async def _tick(self) -> None:
        while self._links:
            await asyncio.sleep(TICK)
            for link in list(self._links.values()):
                try:
                    await link.tick()
                except Exception as exc:  # one link's trouble must not stop the others
                    garbage_log.warning("tick", "link %s: %s: %s", link.recv_subject,
                                        type(exc).__name__, exc)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
