"""Process runner: exec beside a supervised process, with pipes or under a PTY (ptyprocess)."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import pwd
import signal
import termios
from collections.abc import Callable
from dataclasses import dataclass

from ptyprocess import PtyProcess
from rune.agent.runners.base import (
    CommandUnavailable,
    resolve_executable,
    status_from_returncode,
    wait_status_to_exit,
)

from rune.errors import NotFound
from rune.models import ExecOpen, InstanceInfo


@dataclass
class InstanceContext:
    """What an exec inherits from the instance it runs beside."""

    env: dict[str, str]
    workdir: str
    user: str | None = None


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """In the child: be killed when the agent dies, even by SIGKILL (no orphans)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the agent died before prctl took effect
        os._exit(255)


def user_ids(user: str | None) -> tuple[int, int] | None:
    """(uid, gid) to switch to for `user`, or None when no switch is needed."""
    if not user:
        return None
    entry = pwd.getpwnam(user)
    if entry.pw_uid == os.getuid():
        return None
    return entry.pw_uid, entry.pw_gid


def child_setup(cwd: str | None, ids: tuple[int, int] | None,
                die_with: int | None = None) -> Callable[[], None]:
    """The pre-exec step: enter `cwd` while still privileged, drop to `ids`, and tie the
    child's life to process `die_with` (after setuid, which would clear that)."""

    def step() -> None:
        if cwd:
            os.chdir(cwd)
        if ids:
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])
        if die_with:
            _die_with(die_with)

    return step


def spawn_options(cwd: str, ids: tuple[int, int] | None, die_with: int | None = None) -> dict:
    """Keyword arguments for create_subprocess_exec that work on asyncio and uvloop alike
    (uvloop has no user=/group=, and changes directory only after a pre-exec step)."""
    if ids is None and die_with is None:
        return {"cwd": cwd}
    return {"preexec_fn": child_setup(cwd, ids, die_with)}


class PipeExecution:
    """Separate stdin, stdout and stderr pipes; the command leads its own process group."""

    tty = False

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.read_stdout = proc.stdout.read
        self.read_stderr = proc.stderr.read

    async def write_stdin(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command closed its stdin; what it did not read is gone, as with ssh

    async def close_stdin(self) -> None:
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def resize(self, width: int, height: int) -> None:
        pass

    def signal(self, signum: int) -> None:
        _killpg(self.pid, signum)

    async def wait(self) -> tuple[int, int]:
        return status_from_returncode(await self.proc.wait())

    async def terminate(self, grace: float) -> None:
        # SIGHUP, as when an ssh connection drops: the command's session is gone.
        await _terminate_group(self.pid, signal.SIGHUP, grace, self.proc.wait)

    async def kill(self) -> None:
        _killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        _killpg(self.pid, signal.SIGKILL)
        for stream in (self.proc.stdin,):
            if stream and not stream.is_closing():
                stream.close()


class PtyExecution:
    """A command under a pseudo-terminal, read and written without blocking the loop."""

    tty = True

    def __init__(self, ptyproc: PtyProcess) -> None:
        self._ptyproc = ptyproc
        self.pid = ptyproc.pid
        self.fd = ptyproc.fd
        os.set_blocking(self.fd, False)
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[tuple[int, int]] = self._loop.create_future()
        self._pidfd = os.pidfd_open(self.pid)
        self._loop.add_reader(self._pidfd, self._reap)
        self._eof = False
        self._line_open = False  # input since the last end of line (a pending partial line)

    def _reap(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        _, status = os.waitpid(self.pid, 0)
        # ptyprocess must not wait for (or signal) a child that we already reaped.
        self._ptyproc.terminated = True
        if not self._exit.done():
            self._exit.set_result(wait_status_to_exit(status))

    async def _wait_fd(self, add: Callable, remove: Callable) -> None:
        fut = self._loop.create_future()
        add(self.fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            remove(self.fd)

    async def read_stdout(self, n: int) -> bytes:
        while not self._eof:
            try:
                return self._drain(os.read(self.fd, n), n)
            except BlockingIOError:
                await self._wait_fd(self._loop.add_reader, self._loop.remove_reader)
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: every holder of the terminal is gone
                    raise
                self._eof = True
        return b""

    def _drain(self, first: bytes, n: int) -> bytes:
        """Adds whatever else is ready: a PTY hands out ~4 KiB per read, frames want more."""
        if len(first) >= n or not first:
            return first
        chunks = [first]
        size = len(first)
        while size < n:
            try:
                more = os.read(self.fd, n - size)
            except OSError:  # nothing ready now (or EIO, which the next read reports)
                break
            if not more:
                break
            chunks.append(more)
            size += len(more)
        return b"".join(chunks)

    async def read_stderr(self, n: int) -> bytes:
        return b""  # a terminal has one output stream

    async def write_stdin(self, data: bytes) -> None:
        if data:
            self._line_open = data[-1:] not in (b"\n", b"\r")
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                await self._wait_fd(self._loop.add_writer, self._loop.remove_writer)
            except OSError:
                return

    async def close_stdin(self) -> None:
        # VEOF, as Ctrl+D: at the start of a line it is end of file; after a partial line
        # it only hands that line over, so a second one is needed (as when typing).
        eof = self._veof()
        await self.write_stdin(eof * 2 if self._line_open else eof)

    def _veof(self) -> bytes:
        try:
            char = termios.tcgetattr(self.fd)[6][termios.VEOF]
        except (OSError, termios.error):
            return b"\x04"
        return char if isinstance(char, bytes) and char != b"\0" else b"\x04"

    def resize(self, width: int, height: int) -> None:
        # TIOCSWINSZ; the kernel signals SIGWINCH to the terminal's foreground group.
        try:
            self._ptyproc.setwinsize(height, width)
        except OSError:
            pass

    def signal(self, signum: int) -> None:
        try:
            _killpg(os.tcgetpgrp(self.fd), signum)
        except OSError:
            _killpg(self.pid, signum)

    async def wait(self) -> tuple[int, int]:
        return await asyncio.shield(self._exit)

    async def terminate(self, grace: float) -> None:
        await _terminate_group(self.pid, signal.SIGHUP, grace, self.wait)

    async def kill(self) -> None:
        _killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        _killpg(self.pid, signal.SIGKILL)
        self._ptyproc.closed = True  # its __del__ would otherwise wait for the child
        try:
            self._ptyproc.fileobj.close()
        except OSError:
            pass


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
        env = {**context.env, **request.env}
        if request.tty:
            env.setdefault("TERM", "xterm-256color")
        cwd = request.workdir or context.workdir
        if not os.path.isdir(cwd):
            raise CommandUnavailable(126, f"workdir {cwd}: no such directory")
        path = resolve_executable(request.argv[0], env, cwd)
        ids = user_ids(context.user)
        agent_pid = os.getpid()
        if request.tty:
            ptyproc = PtyProcess.spawn(
                [path, *request.argv[1:]], cwd=cwd, env=env,
                dimensions=(request.height or 24, request.width or 80),
                preexec_fn=child_setup(None, ids, agent_pid),  # ptyprocess enters cwd first
            )
            return PtyExecution(ptyproc)
        proc = await asyncio.create_subprocess_exec(
            *request.argv, executable=path,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True,
            limit=1024 * 1024, **spawn_options(cwd, ids, agent_pid),
        )
        return PipeExecution(proc)
