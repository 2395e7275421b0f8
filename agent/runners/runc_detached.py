"""Execs started by `runc exec --detach` and adopted by the agent: pipes or the terminal.

runc leaves once the command runs; the command becomes the agent's child by adoption
(reaper.py: its PID is owned from the moment runc's PID file names it) and is read,
written, signalled and reaped as a process instance's command is. Whether it started is
runc's exit code: 0, the command runs; anything else, runc's words on stderr say why (a
missing command or directory becomes 127/126 with the message the other routes give), and
no command's output can be taken for runc's.

Without a TTY runc passes its stdio through, so the command writes into the agent's own
pipes. With one, `--console-socket` makes runc hand the terminal's master to whoever
listens on that socket (the agent, in its private directory): the agent reads and writes
the container's terminal itself, one hop, as for a process instance's, where `runc exec
-t` in the foreground would copy every byte through a second terminal (a TTY stream
stalled near 26 MB/s here, below `docker exec -t`, whose shim reads the terminal itself).
runc sends the master before the command starts, so the agent sizes the terminal as it
arrives: before the session starts and before any input, though a command's very first
look may still race it (as with `docker exec -t` before Engine API 1.42).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
from collections.abc import Callable

from rune.agent.runners.base import CommandUnavailable
from rune.agent.runners.docker_exec import short_reason, start_failure_code
from rune.agent.runners.process import (
    Child,
    PipeExecution,
    PtyExecution,
    start_child,
    start_on_pipes,
    start_pipes,
)
from rune.agent.runners.reaper import REAPER
from rune.agent.runners.spawn import ChildPlan, readable, set_winsize

from rune.errors import Internal, NotRunning

CONSOLE_WAIT = 5.0  # seconds from runc's exit for its console message, already sent by then
MESSAGE_LIMIT = 64 * 1024  # what is kept of runc's stderr when it fails
_PTMX = (5, 2)  # the master of a terminal: /dev/ptmx (major, minor)


def is_terminal_master(fd: int) -> bool:
    """fd is a pseudo-terminal's master, nothing else a peer could pass."""
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(info.st_mode) and (os.major(info.st_rdev),
                                           os.minor(info.st_rdev)) == _PTMX and os.isatty(fd)


async def receive_master(listener: socket.socket) -> int:
    """The one terminal master runc sends on its console socket; anything else is closed."""
    loop = asyncio.get_running_loop()
    try:
        conn, _ = await loop.sock_accept(listener)
        try:
            await readable(loop, conn.fileno())
            _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        finally:
            conn.close()
    except OSError as exc:
        raise Internal(f"runc's console socket: {exc.strerror or exc}") from None
    master = -1
    for fd in fds:
        if master < 0 and is_terminal_master(fd):
            master = fd
        else:
            os.close(fd)
    if master < 0:
        raise Internal("runc's console socket passed no terminal")
    return master


def _plan(argv: list[str]) -> ChildPlan:
    return ChildPlan(argv=argv, env={"PATH": os.environ.get("PATH", os.defpath)}, cwd="/",
                     die_with=os.getpid())


async def start_with_pipes(argv: list[str], pid_known: asyncio.Future[int],
                           learn_pid: Callable[[], None], stdout_size: int) -> PipeExecution:
    """Runs `argv` (a `runc exec -d --pid-file …`) on new pipes, which runc passes to the
    command; returns the command on them."""
    async def start(stdio: tuple[int, int, int], stderr: int) -> Child:
        runc = await start_child(_plan(argv), stdio)
        try:
            code, _ = await runc.wait()
        except BaseException:
            _kill_group(runc.pid)
            raise
        if code != 0:
            raise _start_failure(read_available(stderr))
        learn_pid()
        return adopt(pid_known)

    try:
        return await start_on_pipes(start, stdout_size)
    except BaseException:
        learn_pid()
        abandon(pid_known)
        raise


async def start_terminal(argv: list[str], socket_path: str, pid_known: asyncio.Future[int],
                         learn_pid: Callable[[], None], width: int, height: int) -> PtyExecution:
    """Runs `argv` (a `runc exec -d -t --console-socket socket_path --pid-file …`) and
    returns the command under the container's terminal, sized width × height. pid_known
    is the PID file's, owned when learnt; learn_pid takes it if it is waiting."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.setblocking(False)
    master = -1
    try:
        listener.bind(socket_path)
        os.chmod(socket_path, 0o600)
        listener.listen(1)
        runc = await start_pipes(_plan(argv))
        try:
            received = asyncio.ensure_future(receive_master(listener))
            left = asyncio.ensure_future(runc.wait())
            try:
                await asyncio.wait((received, left), return_when=asyncio.FIRST_COMPLETED)
                if received.done() and not received.exception():
                    master = received.result()
                    set_winsize(master, width, height)  # before the command's first look
                code, _ = await left
                if code != 0:
                    raise _start_failure(read_available(runc.stderr_fd))
                if master < 0:
                    try:
                        master = await asyncio.wait_for(received, CONSOLE_WAIT)
                    except TimeoutError:
                        raise Internal("runc started the command but sent no terminal") \
                            from None
                    set_winsize(master, width, height)
                learn_pid()
            finally:
                for task in (received, left):
                    task.cancel()
                if received.done() and not received.cancelled() and not received.exception() \
                        and received.result() != master:
                    os.close(received.result())
        finally:
            runc.close()
        return PtyExecution(adopt(pid_known), master)
    except BaseException:
        if master >= 0:
            os.close(master)
        learn_pid()
        abandon(pid_known)
        raise
    finally:
        listener.close()
        try:
            os.unlink(socket_path)
        except OSError:
            pass


def adopt(pid_known: asyncio.Future[int]) -> Child:
    """The command, the agent's child now that runc has left (owned since its PID file
    appeared, so no orphan reaping took it)."""
    pid = pid_known.result() if pid_known.done() and not pid_known.cancelled() else 0
    if not pid or not REAPER.owns(pid):
        raise Internal("runc started the command but its PID was not learnt")
    return Child(pid)


def abandon(pid_known: asyncio.Future[int]) -> None:
    """A start given up after runc ran the command: it is killed and left to the reaper."""
    if pid_known.done() and not pid_known.cancelled() and pid_known.result():
        pid = pid_known.result()
        if REAPER.owns(pid):
            _kill_group(pid)
            REAPER.release(pid)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def read_available(fd: int) -> bytes:
    """What runc wrote before it left: read to EOF or, where the command holds the same
    pipe (runc passes its stdio through), to what is there."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < MESSAGE_LIMIT:
        try:
            chunk = os.read(fd, MESSAGE_LIMIT)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data


def _start_failure(stderr: bytes) -> Exception:
    """runc's words on a failed start as the error the other routes give."""
    text = stderr.decode(errors="replace").strip()
    if "exec failed:" in text:
        reason = short_reason(text.split("exec failed: ", 1)[1].removeprefix(
            "unable to start container process: "))
        return CommandUnavailable(start_failure_code(reason), reason)
    if "not running" in text or "paused" in text or "does not exist" in text:
        return NotRunning(f"container: {text[:200]}")
    return Internal(f"runc exec: {text[:500] or 'failed'}")
