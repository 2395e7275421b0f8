"""`rune exec`: ties one exec stream to the local stdin, stdout, stderr, signals and size."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable

from rune.cli.client import ApiClient, ExecOptions
from rune.cli.terminal import RawMode, window_size

from rune.errors import RuneError, Unavailable

READ_CHUNK = 256 * 1024
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FORCE_QUIT_PRESSES = 3
FORCE_QUIT_WINDOW = 2.0
# Output up to this size goes straight to a terminal from the loop (no thread hop: echo
# latency); anything bigger, or any pipe or file, is written on a worker thread.
INLINE_WRITE = 64 * 1024


def exit_status(code: int, sig: int) -> int:
    """The remote status as a shell reports it: killed by signal N → 128+N."""
    return 128 + sig if sig else code


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class SessionEnded(Exception):
    """The session was ended on this side (force quit, SIGTERM/SIGHUP): message and status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Outbox:
    """The one writer of a stream's requests, so that writes never overlap.

    Signals jump the queue; stdin chunks wait in a short bounded queue (backpressure
    reaches the reader); a burst of resizes becomes one request with the last size.
    """

    def __init__(self, stream: object, depth: int = 4) -> None:
        self.stream = stream
        self._data: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue(depth)
        self._control: deque[Callable[[], Awaitable[None]]] = deque()
        self._size: tuple[int, int] | None = None
        self._wake = asyncio.Event()

    async def stdin(self, data: bytes) -> None:
        await self._data.put(lambda: self.stream.send_stdin(data))
        self._wake.set()

    async def stdin_close(self) -> None:
        await self._data.put(self.stream.close_stdin)
        self._wake.set()

    def signal(self, number: int) -> None:
        self._control.append(lambda: self.stream.signal(number))
        self._wake.set()

    def resize(self, width: int, height: int) -> None:
        self._size = (width, height)
        self._wake.set()

    async def run(self) -> None:
        while True:
            if self._control:
                await self._control.popleft()()
            elif self._size is not None:
                (width, height), self._size = self._size, None
                await self.stream.resize(width, height)
            elif not self._data.empty():
                await self._data.get_nowait()()
            else:
                self._wake.clear()
                await self._wake.wait()


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def pump_stdin(outbox: Outbox, fd: int = 0) -> None:
    """Sends stdin as soon as bytes are read (a keystroke is one request), then EOF.

    Terminals, pipes and sockets are waited on by the loop, so nothing is left blocked
    in a thread at exit; regular files (which the loop cannot wait on) never block.
    """
    loop = asyncio.get_running_loop()
    pollable = True
    while True:
        if pollable:
            try:
                await _readable(loop, fd)
            except OSError:  # EPERM: a regular file or /dev/null
                pollable = False
        try:
            data = os.read(fd, READ_CHUNK) if pollable else \
                await loop.run_in_executor(None, os.read, fd, READ_CHUNK)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            await outbox.stdin_close()
            return
        await outbox.stdin(data)


class ExecCommand:
    def __init__(self, client: ApiClient, options: ExecOptions, verbose: Callable[[str], None],
                 local_tty: bool) -> None:
        self.client = client
        self.options = options
        self.verbose = verbose
        self.local_tty = local_tty  # the local terminal goes raw (a remote TTY with a local one)
        self._interrupts: list[float] = []
        self._ended: SessionEnded | None = None
        self._inline_output = os.isatty(1)
        self._line_open = False  # the last byte shown on the terminal was not a newline

    async def run(self) -> int:
        stream = self.client.exec_stream()
        began = time.monotonic()
        started = await stream.start(self.options)
        self.verbose(f"session {started.session_id} on instance {started.instance_id} "
                     f"(agent {started.agent}, host {started.host}, runner {started.runner}) "
                     f"in {1000 * (time.monotonic() - began):.1f} ms")
        loop = asyncio.get_running_loop()
        outbox = Outbox(stream)
        tasks: list[asyncio.Task] = []
        self._install_signals(loop, stream, outbox)
        try:
            with RawMode(0) if self.local_tty else contextlib.nullcontext():
                tasks += [asyncio.create_task(outbox.run()),
                          asyncio.create_task(pump_stdin(outbox))]
                try:
                    code, sig = await self._relay_output(loop, stream)
                except (RuneError, asyncio.CancelledError):
                    # A call cancelled here fails its pending read with CancelledError.
                    if self._ended is None:
                        raise
                    raise self._ended from None
            # Said once the terminal is cooked again (a raw one would not start a new line).
            self.verbose(f"remote exit code {code}, signal {sig}, after "
                         f"{1000 * (time.monotonic() - began):.1f} ms")
            return exit_status(code, sig)
        except RuneError:
            self._end_line()
            raise
        except SessionEnded as ended:
            self._end_line()
            with contextlib.suppress(OSError):
                sys.stderr.write(f"Error: {ended}\n")
                sys.stderr.flush()
            return ended.status
        finally:
            self._remove_signals(loop)
            for task in tasks:
                task.cancel()

    async def _relay_output(self, loop: asyncio.AbstractEventLoop,
                            stream: object) -> tuple[int, int]:
        """Shows output until the exit status, which it returns as (code, signal)."""
        async for kind, payload in stream.events():
            if kind == "exit":
                return payload
            fd = 1 if kind == "stdout" else 2
            if self._inline_output and len(payload) <= INLINE_WRITE:
                _write_all(fd, payload)
            else:
                await loop.run_in_executor(None, _write_all, fd, payload)
            if payload:
                self._line_open = payload[-1:] != b"\n"
        raise Unavailable("the output ended without an exit status")

    def _end_line(self) -> None:
        """After an abrupt end on a terminal, start our message on a line of its own."""
        if self._line_open and self.options.tty and os.isatty(2):
            with contextlib.suppress(OSError):
                os.write(2, b"\r\n")

    def _install_signals(self, loop: asyncio.AbstractEventLoop, stream: object,
                         outbox: Outbox) -> None:
        if self.options.tty:
            loop.add_signal_handler(signal.SIGWINCH, self._on_resize, outbox)
        for signum in FORWARDED_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, stream, outbox, signum)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in (*FORWARDED_SIGNALS, signal.SIGWINCH):
            loop.remove_signal_handler(signum)

    def _on_resize(self, outbox: Outbox) -> None:
        cols, rows = window_size()
        if cols and rows:
            outbox.resize(cols, rows)

    def _end(self, stream: object, message: str, status: int) -> None:
        if self._ended is None:
            self._ended = SessionEnded(message, status)
            stream.cancel()  # the apiserver then closes the session; the agent kills the command

    def _on_signal(self, stream: object, outbox: Outbox, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.options.tty and signum != signal.SIGINT:
            # A remote shell ignores SIGTERM and a hung-up terminal is gone: as ssh does,
            # end the session (the remote side gets SIGHUP) and give the terminal back.
            self._end(stream, f"{name} received: session ended", 128 + signum)
            return
        if signum == signal.SIGINT:
            now = time.monotonic()
            self._interrupts = [t for t in self._interrupts if now - t < FORCE_QUIT_WINDOW]
            self._interrupts.append(now)
            if len(self._interrupts) >= FORCE_QUIT_PRESSES:
                self._end(stream, f"interrupted {FORCE_QUIT_PRESSES} times: session ended, "
                          "remote command killed", 130)
                return
        outbox.signal(int(signum))
