"""`rune exec`: ties one exec stream to the local stdin, stdout, stderr, signals and size."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Annotated, Optional

import typer
from rune.cli.client import ApiClient, ExecOptions
from rune.cli.common import (
    ApiServerOption,
    CaFileOption,
    Connection,
    ContextOption,
    Job,
    NamespaceOption,
    TokenFileOption,
    checked_flags,
    connect,
    current,
    namespace_of,
)
from rune.cli.invocation import Invocation
from rune.cli.terminal import RawMode, decide_tty, window_size

from rune.errors import RuneError, Unavailable
from rune.heap import keep_freed_buffers

READ_CHUNK = 256 * 1024
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Only a multiplexer client relays these: the `rune` process itself simply stops.
JOB_CONTROL = (signal.SIGTSTP, signal.SIGCONT)
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


def _retrieve(future: asyncio.Future) -> None:
    """A write left behind by an ended session (a closed pipe): its error is not news."""
    if not future.cancelled():
        future.exception()


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


async def pump_stdin(outbox: Outbox, fd: int = 0, running: asyncio.Event | None = None) -> None:
    """Sends stdin as soon as bytes are read (a keystroke is one request), then EOF.

    Terminals, pipes and sockets are waited on by the loop, so nothing is left blocked
    in a thread at exit; regular files (which the loop cannot wait on) never block.
    While `running` is clear (the client is suspended) nothing is read.
    """
    loop = asyncio.get_running_loop()
    pollable = True
    while True:
        if running is not None:
            await running.wait()
        if pollable:
            try:
                await _readable(loop, fd)
            except OSError:  # EPERM: a regular file or /dev/null
                pollable = False
            if running is not None and not running.is_set():
                continue  # suspended while waiting: what was typed is the shell's now
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
                 local_tty: bool, inv: Invocation | None = None) -> None:
        self.inv = inv or Invocation(argv=[])
        self.client = client
        self.options = options
        self.verbose = verbose
        self.local_tty = local_tty  # the local terminal goes raw (a remote TTY with a local one)
        self._interrupts: list[float] = []
        self._ended: SessionEnded | None = None
        self._inline_output = os.isatty(self.inv.stdout)
        self._running = asyncio.Event()
        self._running.set()
        self._raw: RawMode | None = None
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
        self._install_signals(stream, outbox)
        try:
            self._raw = RawMode(self.inv.stdin) if self.local_tty else None
            with self._raw or contextlib.nullcontext():
                tasks += [asyncio.create_task(outbox.run()),
                          asyncio.create_task(pump_stdin(outbox, self.inv.stdin,
                                                         self._running))]
                try:
                    code, sig = await self._relay_output(loop, stream)
                except (RuneError, asyncio.CancelledError) as exc:
                    # A call cancelled here fails its pending read with CancelledError.
                    if self._ended is None:
                        if isinstance(exc, asyncio.CancelledError):
                            # This task was cancelled (the multiplexer's client went away):
                            # end the call, so the apiserver ends the session at once.
                            stream.cancel()
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
            with contextlib.suppress(OSError, ValueError):
                self.inv.err.write(f"Error: {ended}\n")
                self.inv.err.flush()
            return ended.status
        finally:
            self._remove_signals()
            for task in tasks:
                task.cancel()

    async def _relay_output(self, loop: asyncio.AbstractEventLoop,
                            stream: object) -> tuple[int, int]:
        """Shows output until the exit status, which it returns as (code, signal)."""
        # One write may be in flight on a worker thread while the next message is read:
        # the thread's write and the loop's gRPC read overlap. Each write waits for the
        # one before it, so stdout and stderr keep their order.
        writing: asyncio.Future | None = None
        try:
            async for kind, payload in stream.events():
                if writing is not None:
                    await writing
                    writing = None
                if kind == "exit":
                    return payload
                fd = self.inv.stdout if kind == "stdout" else self.inv.stderr
                if self._inline_output and len(payload) <= INLINE_WRITE:
                    _write_all(fd, payload)
                else:
                    if len(payload) > INLINE_WRITE:
                        keep_freed_buffers()  # big output: its messages reuse warm pages
                    writing = loop.run_in_executor(None, _write_all, fd, payload)
                if payload:
                    self._line_open = payload[-1:] != b"\n"
            if writing is not None:
                await writing
                writing = None
        finally:
            if writing is not None:
                writing.add_done_callback(_retrieve)
        raise Unavailable("the output ended without an exit status")

    def _end_line(self) -> None:
        """After an abrupt end on a terminal, start our message on a line of its own."""
        if self._line_open and self.options.tty and os.isatty(self.inv.stderr):
            with contextlib.suppress(OSError):
                os.write(self.inv.stderr, b"\r\n")

    def _install_signals(self, stream: object, outbox: Outbox) -> None:
        signals = self.inv.signals
        if self.options.tty:
            signals.add(signal.SIGWINCH, lambda: self._on_resize(outbox))
        for signum in FORWARDED_SIGNALS:
            signals.add(signum, lambda s=signum: self._on_signal(stream, outbox, s))
        signals.add(signal.SIGTSTP, self._on_suspend)
        signals.add(signal.SIGCONT, self._on_continue)

    def _remove_signals(self) -> None:
        for signum in (*FORWARDED_SIGNALS, *JOB_CONTROL, signal.SIGWINCH):
            self.inv.signals.remove(signum)

    def _on_resize(self, outbox: Outbox) -> None:
        cols, rows = window_size(None, (self.inv.stdout, self.inv.stdin, self.inv.stderr))
        if cols and rows:
            outbox.resize(cols, rows)

    def _on_suspend(self) -> None:
        """The client is about to stop: stop reading its terminal and give it back cooked."""
        self._running.clear()
        if self._raw is not None:
            self._raw.suspend()

    def _on_continue(self) -> None:
        if self._raw is not None:
            self._raw.resume()
        self._running.set()

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


EXEC_VALUED_OPTIONS = {"--namespace", "-n", "--workdir", "--env", "-e", "--timeout",
                       "--api-server", "--token-file", "--ca-file", "--context", "--instances",
                       "--selector", "-l", "--max-parallel", "--batch", "--batch-wait",
                       "--max-fail", "--canary", "--job-timeout"}
NOT_A_TERMINAL = ("Unable to use a TTY - input is not a terminal or the right kind of file; "
                  "the remote command gets a TTY, the local terminal is left as it is\n")


def exec_command(
    target: Annotated[str, typer.Argument(
        metavar="TARGET", help="service name, or instance id (ids contain '-instance-')",
        show_default=False)],
    command: Annotated[list[str], typer.Argument(
        metavar="COMMAND...", help="the command and its arguments, passed verbatim",
        show_default=False)],
    namespace: NamespaceOption = None,
    workdir: Annotated[str, typer.Option(metavar="DIR", help="absolute directory to run in "
                                         "(default: the instance's own)")] = "",
    env: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--env", "-e", metavar="KEY=VALUE", help="extra environment, repeatable")] = None,
    tty: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--tty/--no-tty", "-t", help="force or refuse a remote TTY (default: automatic)")]
    = None,
    timeout: Annotated[str, typer.Option(metavar="DURATION", help="kill the remote command "
                                         "after this long: 30s, 5m, 1h")] = "5m",
    api_server: ApiServerOption = None,
    token_file: TokenFileOption = None,
    ca_file: CaFileOption = None,
    context: ContextOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="say on stderr which rule "
                                          "chose the TTY, where the session ran, timings")]
    = False,
    all_: Annotated[bool, typer.Option("--all", help="fan out: every running instance of "
                                       "TARGET ('*': of every service)")] = False,
    instances: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--instances", metavar="ID,ID,...", help="fan out to these instance ids")] = None,
    selector: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--selector", "-l", metavar="K=V[,K=V]",
        help="fan out to the instances whose labels all match")] = None,
    max_parallel: Annotated[int, typer.Option(metavar="N", help="fan-out: sessions at once",
                                              min=1)] = 256,
    fail_fast: Annotated[bool, typer.Option(
        "--fail-fast", help="fan-out: stop the rest at the first failure")] = False,
    prefix: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--prefix/--no-prefix", help="fan-out: start each line with its instance id "
        "(default: on)", show_default=False)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="fan-out: JSON records, one "
                                              "per line, the target set first")] = False,
    group: Annotated[bool, typer.Option("--group", help="fan-out: identical outputs once, "
                                        "with the instances that produced them")] = False,
    batch: Annotated[str, typer.Option(metavar="N|N%", help="fan-out: at most N members "
                                       "at a time (a sliding window)")] = "",
    batch_wait: Annotated[str, typer.Option(metavar="DURATION", help="fan-out: a freed "
                                            "slot waits this long before the next member")]
    = "",
    max_fail: Annotated[str, typer.Option(metavar="N|N%", help="fan-out: start no more "
                                          "members once more than N failed (rest: skipped)")]
    = "",
    canary: Annotated[int, typer.Option(metavar="N", min=0, help="fan-out: run N members "
                                        "first; the rest only if all of them succeed")] = 0,
    job_timeout: Annotated[str, typer.Option(metavar="DURATION", help="fan-out: time limit "
                                             "of the whole run (--timeout is each member's)")]
    = "",
) -> Job:
    """Run COMMAND inside an instance of TARGET. Rune's options go before COMMAND."""
    connection = Connection(api_server, token_file, ca_file, context)
    from rune.cli.fanout_cmd import RolloutFlags

    rollout = RolloutFlags(batch, batch_wait, max_fail, canary, job_timeout)
    if (all_ or instances or selector or json_output or prefix is not None or fail_fast
            or group or rollout.given):
        from rune.cli.fanout_cmd import fanout_job

        return fanout_job(
            target, command, connection, namespace=namespace, workdir=workdir, env=env or [],
            tty=tty, timeout=timeout, all_=all_, instances=instances or [],
            selector=selector or [], max_parallel=max_parallel, fail_fast=fail_fast,
            prefix=prefix is not False, json_output=json_output, rollout=rollout,
            group=group)
    timeout_seconds, env_map = checked_flags(timeout, env or [], workdir)
    inv = current()

    def say(line: str) -> None:
        if verbose:
            inv.err.write(f"rune: {line}\n")
            inv.err.flush()

    stdin_tty = inv.isatty(inv.stdin)
    remote_tty, why = decide_tty(command, tty, stdin_tty, inv.isatty(inv.stdout))
    say(f"tty {'on' if remote_tty else 'off'}: {why}")
    if remote_tty and not stdin_tty:
        inv.err.write(NOT_A_TERMINAL)
        inv.err.flush()
    cols, rows = window_size(None, (inv.stdout, inv.stdin, inv.stderr)) if remote_tty \
        else (0, 0)
    options = ExecOptions(
        target=target, command=command, namespace=namespace_of(inv, namespace, connection),
        workdir=workdir, env=env_map, tty=remote_tty, width=cols, height=rows,
        timeout=timeout_seconds, term=inv.env.get("TERM") or "xterm-256color")

    async def session(inv: Invocation) -> int:
        async with connect(inv, connection) as client:
            say(f"api server {client.address}, namespace {options.namespace}, target {target}")
            return await ExecCommand(client, options, say, remote_tty and stdin_tty, inv).run()

    return Job(session, "failed to initialize exec session")
