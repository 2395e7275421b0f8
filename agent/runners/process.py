"""Process runner: exec beside a supervised process, with pipes or under a PTY.

Both kinds are started by rune.agent.runners.spawn (privileges first, then the
directory, then argv[0]) and read and written as non-blocking descriptors on the loop.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import termios
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from rune.agent.account import Account
from rune.agent.environment import exec_environment
from rune.agent.isolation import Isolation
from rune.agent.runners.base import wait_status_to_exit
from rune.agent.runners.reaper import REAPER
from rune.agent.runners.spawn import (
    ChildPlan,
    fork_child,
    raise_report,
    read_report,
    set_winsize,
)

from rune import frames
from rune.errors import NotFound
from rune.models import ExecOpen, InstanceInfo


@dataclass
class InstanceContext:
    """What an exec inherits from the instance it runs beside."""

    env: dict[str, str]
    workdir: str
    account: Account
    isolation: Isolation | None = None  # set by the supervisor for hide_paths


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class Child:
    """A forked child, reaped through a pidfd on the loop: wait() gives (code, signal)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[tuple[int, int]] = self._loop.create_future()
        self.returncode: int | None = None
        REAPER.own(pid)  # the agent may be a subreaper (reaper.py): this one is ours to reap
        self._pidfd = os.pidfd_open(pid)
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        _, status = os.waitpid(self.pid, 0)
        REAPER.release(self.pid)
        REAPER.reap_orphans()  # any orphan shown behind this child
        self.returncode = os.waitstatus_to_exitcode(status)
        if not self._exit.done():
            self._exit.set_result(wait_status_to_exit(status))

    async def wait(self) -> tuple[int, int]:
        return await asyncio.shield(self._exit)


async def start_child(plan: ChildPlan, stdio: tuple[int, int, int],
                      terminal: int | None = None) -> Child:
    """Forks the child and waits for its exec; raises what the child reported instead."""
    pid, report_fd = fork_child(plan, stdio, terminal)
    child = Child(pid)
    report = await read_report(report_fd)
    if report is not None:
        await child.wait()
        raise_report(report)
    return child


class _Fd:
    """One non-blocking descriptor read and written on the loop.

    close() unregisters it from the loop before closing it: a descriptor number is reused
    by the next pipe at once, and a stale registration would steal that pipe's events."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self._waiters: set[asyncio.Future] = set()
        self._gather: bytearray | None = None  # see _more

    async def _wait(self, add: Callable, remove: Callable) -> None:
        fut = self._loop.create_future()
        add(self.fd, lambda: fut.done() or fut.set_result(None))
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if not self.closed:
                remove(self.fd)

    async def read(self, n: int) -> bytes:
        """Up to n bytes, b'' at EOF (EIO on a terminal whose every holder is gone)."""
        while not self.closed:
            try:
                return self._more(os.read(self.fd, n), n)
            except BlockingIOError:
                await self._wait(self._loop.add_reader, self._loop.remove_reader)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                return b""
        return b""

    def _more(self, first: bytes, n: int) -> bytes:
        """Adds whatever else is ready: one read gives a pipe's or PTY's chunk, frames
        want more. The rest is read into one reused buffer (a PTY gives ~4 KiB a read;
        a read of its own would allocate n bytes each time) and copied out once."""
        if len(first) >= n or not first:
            return first
        if self._gather is None or len(self._gather) < n:
            self._gather = bytearray(n)
        size = len(first)
        with memoryview(self._gather) as view:
            view[:size] = first
            while size < n:
                try:
                    got = os.readv(self.fd, [view[size:n]])
                except OSError:  # nothing ready now (or EIO, which the next read reports)
                    break
                if not got:
                    break
                size += got
            return first if size == len(first) else view[:size].tobytes()

    def waiting(self, fut: asyncio.Future) -> None:
        """fut ends (EOF) when this descriptor closes."""
        self._waiters.add(fut)

    def done_waiting(self, fut: asyncio.Future) -> None:
        self._waiters.discard(fut)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.closed:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                await self._wait(self._loop.add_writer, self._loop.remove_writer)
            except OSError:
                return  # the command closed its side; what it did not read is gone

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.fd)
        self._loop.remove_writer(self.fd)
        for fut in self._waiters:  # a pending read or write ends: EOF
            if not fut.done():
                fut.set_result(None)
        os.close(self.fd)


class PipeExecution:
    """Separate stdin, stdout and stderr pipes; the command leads its own process group."""

    tty = False

    def __init__(self, child: Child, stdin: _Fd, stdout: _Fd, stderr: _Fd) -> None:
        self.child = child
        self.pid = child.pid
        self._stdin, self._stdout, self._stderr = stdin, stdout, stderr
        self.read_stdout = stdout.read
        self.read_stderr = stderr.read
        self.stderr_fd = stderr.fd  # for a starter's own words once it has left

    async def write_stdin(self, data: bytes) -> None:
        await self._stdin.write(data)

    async def close_stdin(self) -> None:
        self._stdin.close()

    def resize(self, width: int, height: int) -> None:
        pass

    def signal(self, signum: int) -> None:
        _killpg(self.pid, signum)

    async def wait(self) -> tuple[int, int]:
        return await self.child.wait()

    async def terminate(self, grace: float) -> None:
        # SIGHUP, as when an ssh connection drops: the command's session is gone.
        await _terminate_group(self.pid, signal.SIGHUP, grace, self.child.wait)

    async def kill(self) -> None:
        _killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        _killpg(self.pid, signal.SIGKILL)
        for end in (self._stdin, self._stdout, self._stderr):
            end.close()


TTY_FLOWING = 2048
TTY_CORK = 0.001  # seconds
TTY_BUFFER = 64 * 1024  # what an interactive session holds; grows while output streams


class TerminalOutput:
    """A terminal's output, read whenever the terminal has some, into one buffer.

    A terminal hands out ~4 KiB a read and holds little more: read only when a frame is
    wanted, the command stalls while each frame goes out, and a future, a timeout and a
    loop registration per read cost more than the read (a TTY stream stopped near
    30 MB/s). So the loop's reader callback drains the terminal as it fills, into a buffer
    that grows to one frame; reading pauses while the buffer is full (the command then
    blocks on its terminal: backpressure) and resumes when a frame is taken."""

    def __init__(self, master: _Fd, limit: int) -> None:
        self._master = master
        self._limit = limit
        self._buffer = bytearray(min(TTY_BUFFER, limit))
        self._size = 0
        self._eof = False
        self._want = 1
        self._ready: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._resume()

    def _resume(self) -> None:
        if not self._reading and not self._eof and not self._master.closed:
            self._loop.add_reader(self._master.fd, self._readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._reading = False
            if not self._master.closed:
                self._loop.remove_reader(self._master.fd)

    def _readable(self) -> None:
        if self._size == len(self._buffer) and len(self._buffer) < self._limit:
            self._buffer.extend(bytes(min(len(self._buffer), self._limit - len(self._buffer))))
        with memoryview(self._buffer) as view:
            while self._size < len(view):
                try:
                    got = os.readv(self._master.fd, [view[self._size:]])
                except BlockingIOError:
                    break
                except OSError:  # EIO: every holder of the terminal is gone
                    got = 0
                if not got:
                    self._eof = True
                    self._pause()
                    break
                self._size += got
        if self._size >= len(self._buffer) and len(self._buffer) >= self._limit:
            self._pause()
        if self._size >= self._want or self._eof:
            self._wake()

    def _wake(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def _wait(self, want: int, timeout: float | None) -> None:
        self._want = want
        self._ready = self._loop.create_future()
        self._master.waiting(self._ready)
        timer = self._loop.call_later(timeout, self._wake) if timeout is not None else None
        try:
            await self._ready
        finally:
            if timer is not None:
                timer.cancel()
            self._master.done_waiting(self._ready)
            self._ready = None

    async def read(self, n: int) -> bytes:
        """Up to n bytes, b'' at EOF. While output streams (TTY_FLOWING or more waiting),
        what TTY_CORK more brings goes in the same frame: a frame per ~100 KiB for the
        relay instead of per 4 KiB. An echo is small and goes at once."""
        if not self._size and not self._eof and not self._master.closed:
            await self._wait(1, None)
        if TTY_FLOWING <= self._size < n and not self._eof and not self._master.closed:
            await self._wait(n, TTY_CORK)
        size = min(n, self._size)
        if not size:
            return b""
        with memoryview(self._buffer) as view:
            data = view[:size].tobytes()
            rest = self._size - size
            if rest:
                view[:rest] = view[size:self._size]
        self._size = rest
        self._resume()
        return data


class PtyExecution:
    """A command under a pseudo-terminal, read and written without blocking the loop."""

    tty = True

    def __init__(self, child: Child, master: int) -> None:
        self.child = child
        self.pid = child.pid
        self.fd = master
        self._master = _Fd(master)
        self._output = TerminalOutput(self._master, frames.MAX_DATA)
        self.read_stdout = self._output.read
        self._line_open = False  # input since the last end of line (a pending partial line)

    async def read_stderr(self, n: int) -> bytes:
        return b""  # a terminal has one output stream

    async def write_stdin(self, data: bytes) -> None:
        if data:
            self._line_open = data[-1:] not in (b"\n", b"\r")
        await self._master.write(data)

    async def close_stdin(self) -> None:
        # VEOF, as Ctrl+D: at the start of a line it is end of file; after a partial line
        # it only hands that line over, so a second one is needed (as when typing).
        eof = self._veof()
        await self.write_stdin(eof * 2 if self._line_open else eof)

    def _veof(self) -> bytes:
        if self._master.closed:
            return b"\x04"
        try:
            char = termios.tcgetattr(self.fd)[6][termios.VEOF]
        except (OSError, termios.error):
            return b"\x04"
        return char if isinstance(char, bytes) and char != b"\0" else b"\x04"

    def resize(self, width: int, height: int) -> None:
        # TIOCSWINSZ; the kernel signals SIGWINCH to the terminal's foreground group.
        if self._master.closed:  # its number may belong to another session's terminal now
            return
        try:
            set_winsize(self.fd, width, height)
        except OSError:
            pass

    def signal(self, signum: int) -> None:
        if self._master.closed:
            _killpg(self.pid, signum)
            return
        try:
            _killpg(os.tcgetpgrp(self.fd), signum)
        except OSError:
            _killpg(self.pid, signum)

    async def wait(self) -> tuple[int, int]:
        return await self.child.wait()

    async def terminate(self, grace: float) -> None:
        await _terminate_group(self.pid, signal.SIGHUP, grace, self.wait)

    async def kill(self) -> None:
        _killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        _killpg(self.pid, signal.SIGKILL)
        self._master.close()


async def _terminate_group(pgid: int, first: int, grace: float, wait: Callable) -> None:
    _killpg(pgid, first)
    _killpg(pgid, signal.SIGCONT)
    try:
        await asyncio.wait_for(asyncio.shield(wait()), grace)
    except TimeoutError:
        pass
    _killpg(pgid, signal.SIGKILL)


class ProcessRunner:
    name = "process"

    def __init__(self, contexts: Callable[[str], InstanceContext | None]) -> None:
        self._contexts = contexts

    async def exec(self, instance: InstanceInfo, request: ExecOpen) -> PipeExecution | PtyExecution:
        context = self._contexts(instance.instance_id)
        if context is None:
            raise NotFound(f"instance {instance.instance_id} is not supervised by this agent")
        plan = ChildPlan(argv=list(request.argv),
                         env=exec_environment(context.env, request.env, request.tty),
                         cwd=request.workdir or context.workdir,
                         account=context.account.switch, die_with=os.getpid(),
                         isolation=context.isolation)
        if request.tty:
            return await _start_pty(plan, request.width or 80, request.height or 24)
        return await start_pipes(plan, pipe_size(request.window))


async def _start_pty(plan: ChildPlan, width: int, height: int) -> PtyExecution:
    master, slave = os.openpty()
    try:
        set_winsize(slave, width, height)
        if plan.account is not None:  # the terminal is its user's, as sshd does
            os.fchown(slave, plan.account.uid, -1)
            os.fchmod(slave, 0o620)
        child = await start_child(plan, (slave, slave, slave), terminal=slave)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return PtyExecution(child, master)


# A pipe holds 64 KiB by default: a fast command then fills it between two reads, and a
# 1 MiB frame costs sixteen reads and a join. A quarter of the session's window (capped
# at one frame) lets one read take a frame; a fan-out member's small window keeps the
# default, so a thousand sessions do not pin a thousand large kernel buffers.
DEFAULT_PIPE = 64 * 1024
MAX_PIPE = 1024 * 1024


def pipe_size(window: int) -> int:
    return max(DEFAULT_PIPE, min(MAX_PIPE, window // 4))


def _grow_pipe(fd: int, size: int) -> None:
    if size <= DEFAULT_PIPE:
        return
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError:  # above /proc/sys/fs/pipe-max-size or the user's pipe quota: keep it
        pass


async def start_pipes(plan: ChildPlan, stdout_size: int = DEFAULT_PIPE) -> PipeExecution:
    async def start(stdio: tuple[int, int, int], _stderr: int) -> Child:
        return await start_child(plan, stdio)

    return await start_on_pipes(start, stdout_size)


async def start_on_pipes(start: Callable[[tuple[int, int, int], int], Awaitable[Child]],
                         stdout_size: int = DEFAULT_PIPE) -> PipeExecution:
    """The command `start` makes on three new pipes' far ends (given with the read end of
    stderr, for a starter whose own failure is told there), read and written here."""
    ends: list[int] = []
    try:
        stdin_r, stdin_w = os.pipe()
        ends += [stdin_r, stdin_w]
        stdout_r, stdout_w = os.pipe()
        ends += [stdout_r, stdout_w]
        _grow_pipe(stdout_r, stdout_size)
        stderr_r, stderr_w = os.pipe()
        ends += [stderr_r, stderr_w]
        child = await start((stdin_r, stdout_w, stderr_w), stderr_r)
    except BaseException:
        for fd in ends:
            os.close(fd)
        raise
    for fd in (stdin_r, stdout_w, stderr_w):
        os.close(fd)
    return PipeExecution(child, _Fd(stdin_w), _Fd(stdout_r), _Fd(stderr_r))
