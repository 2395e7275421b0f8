"""`rune exec`: ties one exec stream to the local stdin, stdout, stderr, signals and size."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from cli.client import ApiClient, ExecOptions
from cli.terminal import RawMode, window_size

READ_CHUNK = 256 * 1024
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FORCE_QUIT_PRESSES = 3
FORCE_QUIT_WINDOW = 2.0


def exit_status(code: int, sig: int) -> int:
    """The remote status as a shell reports it: killed by signal N → 128+N."""
    return 128 + sig if sig else code


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _start_stdin_reader(loop: asyncio.AbstractEventLoop,
                        queue: asyncio.Queue[bytes]) -> None:
    """Reads stdin on a daemon thread (works for pipes, files and terminals alike)."""

    def reader() -> None:
        while True:
            try:
                data = os.read(0, READ_CHUNK)
            except OSError:
                data = b""
            asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
            if not data:
                return

    threading.Thread(target=reader, name="stdin", daemon=True).start()


class ExecCommand:
    def __init__(self, client: ApiClient, options: ExecOptions, verbose: Callable[[str], None],
                 local_tty: bool) -> None:
        self.client = client
        self.options = options
        self.verbose = verbose
        self.local_tty = local_tty  # the local terminal goes raw (a remote TTY with a local one)
        self._interrupts: list[float] = []

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stream = self.client.exec_stream()
        began = time.monotonic()
        started = await stream.start(self.options)
        self.verbose(f"session {started.session_id} on instance {started.instance_id} "
                     f"(agent {started.agent}, host {started.host}, runner {started.runner}) "
                     f"in {1000 * (time.monotonic() - began):.1f} ms")
        raw = RawMode(0) if self.local_tty else None
        stdin_queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        _start_stdin_reader(loop, stdin_queue)
        pump = asyncio.create_task(self._pump_stdin(stream, stdin_queue))
        self._install_signals(loop, stream)
        try:
            if raw:
                raw.__enter__()
            async for kind, payload in stream.events():
                if kind == "exit":
                    code, sig = payload
                    self.verbose(f"remote exit code {code}, signal {sig}, after "
                                 f"{1000 * (time.monotonic() - began):.1f} ms")
                    return exit_status(code, sig)
                fd = 1 if kind == "stdout" else 2
                await loop.run_in_executor(None, _write_all, fd, payload)
            return 255
        finally:
            if raw:
                raw.restore()
            pump.cancel()
            self._remove_signals(loop)

    async def _pump_stdin(self, stream: object, queue: asyncio.Queue[bytes]) -> None:
        while True:
            data = await queue.get()
            if not data:
                await stream.close_stdin()
                return
            await stream.send_stdin(data)

    def _install_signals(self, loop: asyncio.AbstractEventLoop, stream: object) -> None:
        if self.options.tty:
            loop.add_signal_handler(signal.SIGWINCH, self._on_resize, loop, stream)
        for signum in FORWARDED_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, loop, stream, signum)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in (*FORWARDED_SIGNALS, signal.SIGWINCH):
            loop.remove_signal_handler(signum)

    def _on_resize(self, loop: asyncio.AbstractEventLoop, stream: object) -> None:
        cols, rows = window_size()
        if cols and rows:
            loop.create_task(stream.resize(cols, rows))

    def _on_signal(self, loop: asyncio.AbstractEventLoop, stream: object, signum: int) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            self._interrupts = [t for t in self._interrupts if now - t < FORCE_QUIT_WINDOW]
            self._interrupts.append(now)
            if len(self._interrupts) >= FORCE_QUIT_PRESSES:
                sys.stderr.write("\r\nError: interrupted 3 times; ending the session and "
                                 "killing the remote command\r\n")
                stream.cancel()
                return
        loop.create_task(stream.signal(int(signum)))
