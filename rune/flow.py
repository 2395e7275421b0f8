"""One direction of a session as a reliable, credit-limited stream (transport-agnostic).

The sender numbers every frame, keeps it until the receiver has *consumed* it,
and may have at most `window` data bytes unconsumed: no credit, no send, so the
producer upstream blocks (end-to-end backpressure, as SSH channel windows do).

The receiver acknowledges two numbers, ``[consumed, received]``: `consumed`
returns credit, `received` tells the sender which frames arrived (sit in the
receiver's queue) and need no retransmission. A gap (a frame lost in a broker
reconnect) is answered at once by an ack that does not advance; the sender then
goes back and retransmits everything after `received`. Duplicates are dropped
by sequence number, so nothing is lost or doubled.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from rune import frames

Publish = Callable[[bytes], Awaitable[None]]
# A data frame as (header, payload): sent as two buffers, never joined into one.
PublishParts = Callable[[tuple[bytes, bytes]], Awaitable[None]]


async def _nowhere(_frame: object) -> None:
    return None


class Sender:
    def __init__(self, publish: Publish, window: int, rto: float = 1.0,
                 publish_parts: PublishParts | None = None) -> None:
        self._publish = publish
        self._publish_parts = publish_parts
        self.window = window
        self.rto = rto
        self._next_seq = 1
        self._unacked: deque[tuple[int, bytes | tuple[bytes, bytes], int]] = deque()
        self._unacked_bytes = 0
        self.consumed = 0
        self.received = 0
        self._credit = asyncio.Event()
        self._credit.set()
        self.acked = asyncio.Event()  # set whenever the peer consumed more (cleared by waiters)
        self._last_progress = time.monotonic()
        self._last_retransmit = 0.0
        self.retransmits = 0
        self.stalls = 0

    def detach(self) -> None:
        """Its link is closed: the link's bound methods are let go, so that the two no
        longer hold each other and an ended session is freed by reference counting, not
        left for the cycle collector (a fan-out ends thousands at once). Later sends go
        nowhere."""
        self._publish = self._publish_parts = _nowhere

    @property
    def sent(self) -> int:
        return self._next_seq - 1

    @property
    def unacked_bytes(self) -> int:
        return self._unacked_bytes

    def all_consumed(self) -> bool:
        return not self._unacked

    async def send(self, kind: int, payload: Any = None, size: int = 0) -> None:
        """Sends one frame; a data frame of `size` bytes first waits for credit."""
        if size:
            while self._unacked_bytes and self._unacked_bytes + size > self.window:
                self._credit.clear()
                self.stalls += 1
                await self._credit.wait()
        seq = self._next_seq
        self._next_seq += 1
        frame: bytes | tuple[bytes, bytes]
        if self._publish_parts is not None and kind in frames.DATA_KINDS \
                and type(payload) is bytes:
            frame = (frames.data_header(kind, seq, len(payload)), payload)
        else:
            frame = frames.encode(kind, seq, payload)
        if not self._unacked:
            self._last_progress = time.monotonic()
        self._unacked.append((seq, frame, size))
        self._unacked_bytes += size
        await self._send_frame(frame)

    async def _send_frame(self, frame: bytes | tuple[bytes, bytes]) -> None:
        if type(frame) is tuple:
            await self._publish_parts(frame)
        else:
            await self._publish(frame)

    async def on_ack(self, consumed: int, received: int) -> None:
        consumed = min(consumed, self.sent)
        received = max(min(received, self.sent), consumed)
        progressed = received > self.received or consumed > self.consumed
        if consumed > self.consumed:
            self.consumed = consumed
            while self._unacked and self._unacked[0][0] <= consumed:
                self._unacked_bytes -= self._unacked.popleft()[2]
            self._credit.set()
            self.acked.set()
        self.received = max(self.received, received)
        if progressed:
            self._last_progress = time.monotonic()
        elif self.received < self.sent:
            # A non-advancing ack while frames are outstanding means the peer saw a gap.
            await self.retransmit(min_interval=self.rto / 5)

    async def tick(self) -> None:
        """Retransmits when frames are outstanding and nothing progressed for `rto`."""
        if self.received < self.sent and time.monotonic() - self._last_progress > self.rto:
            await self.retransmit(min_interval=self.rto)

    async def retransmit(self, min_interval: float) -> None:
        now = time.monotonic()
        if now - self._last_retransmit < min_interval:
            return
        self._last_retransmit = now
        self._last_progress = now
        for seq, frame, _ in list(self._unacked):
            if seq > self.received:
                self.retransmits += 1
                await self._send_frame(frame)


class Receiver:
    """Accepts frames in sequence order and tracks what to acknowledge."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.received = 0
        self.consumed = 0
        self.acked_consumed = 0
        self.acked_received = 0
        self._consumed_bytes_since_ack = 0
        self.gaps = 0
        self.duplicates = 0

    def accept(self, seq: int) -> bool | None:
        """True: next in order, deliver it. False: duplicate, drop. None: gap, drop and nack."""
        if seq == self.received + 1:
            self.received = seq
            return True
        if seq <= self.received:
            self.duplicates += 1
            return False
        self.gaps += 1
        return None

    def mark_consumed(self, seq: int, size: int) -> bool:
        """Records consumption; True when enough credit piled up to ack right away."""
        self.consumed = max(self.consumed, seq)
        self._consumed_bytes_since_ack += size
        return self._consumed_bytes_since_ack >= self.window // 4 or size == 0

    def ack_due(self) -> bool:
        return self.consumed > self.acked_consumed or self.received > self.acked_received

    def ack_payload(self) -> list[int]:
        self.acked_consumed = self.consumed
        self.acked_received = self.received
        self._consumed_bytes_since_ack = 0
        return [self.consumed, self.received]
