"""Batch open: the session opens waiting for one agent go to it in one request.

Each member of a fan-out is its own session in the core, which opens it on the agent
(SessionCore.open_on_agent). Asked one by one, 1,000 members are 1,000 request/replies
and 1,000 agent-side tasks; here the opens that are waiting for an agent in the same turn
of the loop leave together, as one `rune.agent.<agent>.exec` request:

    request  {"kind": "exec_batch", "opens": [<packed open>, ...]}   exec or copy opens
    reply    {"opened": [<ExecOpened as a map>, ...]}       same order, one per open

Every open (an ExecOpen, or a copy's open, kinds 30-34) is still validated on its own by the
agent and answered as the plain request would be, so one bad or refused open fails only its
own session. An open alone, or one too large to share a message, goes as the plain single
request, as before.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from rune import frames
from rune.errors import Unavailable
from rune.models import EXEC_BATCH, MAX_BATCH_OPENS
from rune.subjects import Subjects

MAX_BATCH_BYTES = 512 * 1024  # well under NATS max_payload (1 MiB)


class OpenBatcher:
    """Coalesces concurrent opens per agent; `open` gives the agent's raw reply map."""

    def __init__(self, nc: NATS, subjects: Subjects, timeout: float) -> None:
        self.nc = nc
        self.subjects = subjects
        self.timeout = timeout
        self._waiting: dict[str, list[tuple[bytes, asyncio.Future]]] = defaultdict(list)
        self._tasks: set[asyncio.Task] = set()
        self.requests = 0  # NATS requests sent (bench and tests read it)

    async def open(self, agent: str, packed: bytes) -> Any:
        """The agent's answer to one packed ExecOpen; Unavailable when it does not answer."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        waiting = self._waiting[agent]
        if not waiting:
            loop.call_soon(self._flush, agent)
        waiting.append((packed, future))
        return await future

    def _flush(self, agent: str) -> None:
        waiting = self._waiting.pop(agent, [])
        batch: list[tuple[bytes, asyncio.Future]] = []
        size = 0
        for item in waiting:
            if item[1].done():  # its session was cancelled meanwhile: never sent
                continue
            if batch and (len(batch) >= MAX_BATCH_OPENS or size + len(item[0]) > MAX_BATCH_BYTES):
                self._send(agent, batch)
                batch, size = [], 0
            batch.append(item)
            size += len(item[0])
        if batch:
            self._send(agent, batch)

    def _send(self, agent: str, batch: list[tuple[bytes, asyncio.Future]]) -> None:
        task = asyncio.create_task(self._request(agent, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _request(self, agent: str, batch: list[tuple[bytes, asyncio.Future]]) -> None:
        self.requests += 1
        try:
            if len(batch) == 1 or len(batch[0][0]) > MAX_BATCH_BYTES:
                replies = [await self._ask(agent, batch[0][0])]
            else:
                data = frames.pack({"kind": EXEC_BATCH, "opens": [p for p, _ in batch]})
                # The agent answers once every open of the batch has started: allow for
                # its spawns, as one by one each would have had its own timeout.
                timeout = self.timeout * min(4.0, 1.0 + len(batch) / 16)
                replies = _replies(await self._ask(agent, data, timeout), len(batch), agent)
        except Unavailable as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if not future.done():
                future.set_result(reply)

    async def _ask(self, agent: str, data: bytes, timeout: float | None = None) -> Any:
        try:
            reply = await self.nc.request(self.subjects.agent_exec(agent), data,
                                          timeout=timeout or self.timeout)
        except (NoRespondersError, NatsTimeout):
            raise Unavailable(f"agent {agent} is not reachable") from None
        except Exception as exc:
            raise Unavailable(f"broker unavailable: {exc}") from None
        try:
            return frames.unpack(reply.data)
        except ValueError as exc:
            raise Unavailable(f"agent {agent} answered nonsense: {exc}") from None


def _replies(answer: Any, count: int, agent: str) -> list[Any]:
    opened = answer.get("opened") if isinstance(answer, dict) else None
    if not isinstance(opened, list) or len(opened) != count:
        if isinstance(answer, dict) and answer.get("ok") is False:
            return [answer] * count  # refused as a whole (e.g. an agent without batches)
        raise Unavailable(f"agent {agent} answered nonsense: not {count} batch replies")
    return opened
