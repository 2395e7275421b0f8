"""One exec session on the agent: pumps output against credit, applies input, ends cleanly.

States: running → exited (command done, output draining) → finished (exit sent and
consumed) ; or → aborted (peer lost, CLOSE, timeout), which kills the command.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from rune.agent.runners.base import Execution, signal_name

from rune import bounds, frames
from rune.errors import DeadlineExceeded, RuneError
from rune.link import SessionLink
from rune.models import ExecOpen

log = logging.getLogger(__name__)


class ExecSession:
    def __init__(
        self,
        link: SessionLink,
        execution: Execution,
        request: ExecOpen,
        exit_grace: float,
        kill_grace: float,
        on_done: Callable[[ExecSession], Awaitable[None]] | None = None,
    ) -> None:
        self.link = link
        self.execution = execution
        self.request = request
        self.id = request.session_id
        self.exit_grace = exit_grace
        self.kill_grace = kill_grace
        self._on_done = on_done
        # Resolved once the command has exited: every pump waits on this one future
        # (no waiter task per pump).
        self._exited = asyncio.get_running_loop().create_future()
        self.started = time.monotonic()
        self.result: tuple[int, int] | None = None

    async def run(self) -> None:
        pumps = [asyncio.create_task(self._pump(self.execution.read_stdout, frames.STDOUT))]
        if not self.execution.tty:
            pumps.append(asyncio.create_task(self._pump(self.execution.read_stderr,
                                                        frames.STDERR)))
        inputs = asyncio.create_task(self._apply_input())
        waiter = asyncio.create_task(self.execution.wait())
        try:
            outcome = await self._until_exit(waiter, inputs)
            if outcome is None:
                self.result = waiter.result()
                self._exit_seen()
                await asyncio.gather(*pumps)
                await self.link.send(frames.EXIT, {"code": self.result[0],
                                                   "signal": self.result[1]})
            else:
                await self.execution.kill() if isinstance(outcome, DeadlineExceeded) \
                    else await self.execution.terminate(self.kill_grace)
                self._exit_seen()
                if isinstance(outcome, DeadlineExceeded):
                    await asyncio.gather(*pumps)
                    await self.link.send(frames.ERROR, outcome.to_wire())
            await self._until_consumed()
        finally:
            for task in (*pumps, inputs, waiter):
                task.cancel()
            self.execution.close()
            await self.link.close()
            if self._on_done:
                await self._on_done(self)

    def _exit_seen(self) -> None:
        if not self._exited.done():
            self._exited.set_result(None)

    async def _until_exit(self, waiter: asyncio.Task, inputs: asyncio.Task) -> RuneError | None:
        """None when the command exited; otherwise why the session must end early."""
        lost = asyncio.create_task(self.link.lost_event.wait())
        try:
            done, _ = await asyncio.wait(
                (waiter, inputs, lost), timeout=self.request.timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            lost.cancel()
        if waiter in done:
            return None
        if not done:
            log.info("session %s: timeout after %ss", self.id, self.request.timeout)
            return DeadlineExceeded(f"command timed out after {self.request.timeout:g}s")
        if self.link.lost is not None:
            log.warning("session %s: %s; stopping the command", self.id, self.link.lost)
            return self.link.lost
        return inputs.result() or RuneError("session closed")

    async def _until_consumed(self) -> None:
        """Waits until the peer consumed everything (exit included), or is lost."""
        sender = self.link.sender
        while not sender.all_consumed() and self.link.lost is None:
            # Woken by the ack itself (a fan-out member's slot frees at once); the timeout
            # only bounds how late a lost peer is noticed.
            sender.acked.clear()
            try:
                await asyncio.wait_for(sender.acked.wait(), 0.1)
            except TimeoutError:
                pass

    async def _pump(self, read: Callable[[int], Awaitable[bytes]], kind: int) -> None:
        """Forwards output until EOF; after exit, until EOF or `exit_grace` of silence."""
        exited = self._exited
        while True:
            reading = asyncio.ensure_future(read(frames.MAX_DATA))
            if not exited.done():
                await asyncio.wait((reading, exited), return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                # A background child may hold the pipe open forever: do not hang on it.
                await asyncio.wait((reading,), timeout=self.exit_grace)
            if not reading.done():
                reading.cancel()
                return
            data = reading.result()
            if not data:
                return
            await self.link.send(kind, data, len(data))

    async def _apply_input(self) -> RuneError | None:
        """Applies stdin, resizes and signals in order; returns when the peer closes."""
        while True:
            try:
                kind, payload = await self.link.recv()
            except RuneError as exc:
                return exc
            if kind == frames.STDIN:
                if isinstance(payload, (bytes, bytearray)):
                    await self.execution.write_stdin(bytes(payload))
            elif kind == frames.STDIN_EOF:
                await self.execution.close_stdin()
            elif kind == frames.RESIZE:
                if _terminal_size(payload):
                    self.execution.resize(payload[0], payload[1])
            elif kind == frames.SIGNAL:
                if isinstance(payload, int) and 0 < payload < 65:
                    log.info("session %s: forwarding %s", self.id, signal_name(payload))
                    self.execution.signal(payload)
            elif kind == frames.CLOSE:
                log.info("session %s: closed by peer: %s", self.id, payload)
                return RuneError(f"closed by peer: {payload}")


def _terminal_size(payload: object) -> bool:
    """A resize is [width, height], each an int 0-65535; anything else is dropped."""
    return (isinstance(payload, list) and len(payload) == 2
            and all(type(v) is int and 0 <= v <= bounds.MAX_TERMINAL for v in payload))
