"""Command starts parked in containers: runc's cost paid before the exec is asked for.

A `runc exec` costs ~35 ms here (runc's start, its re-exec to join the container, the
seccomp filter compiled for every exec), most of what an exec into a container costs
beyond one into a process. So once a container has had an exec, the agent has runc start
the next one at once, ahead of need: `rune-parked` (parked.c) joins the container exactly
as any command of `runc exec` does (namespaces, cgroup, capabilities, seccomp, AppArmor,
user, rlimits, environment, directory: all from the container's config.json, by runc) and
waits on a socket. The exec that comes next sends it the command, its environment
overrides, directory and stdio (or asks for the container's terminal), and it becomes the
command: the agent's adopted child, as runc's own detached exec would be (runc_detached.py),
read, signalled and reaped the same way. Then the next one is parked.

The program is sent as a sealed memfd (`--preserve-fds`: runc execs /proc/self/fd/3), so
nothing is put into or needed from the container's filesystem and nothing in there can
rewrite it. One parked start per container at most, given up after `idle` seconds
unused: it shows in the container's process list as `rune-parked`, holds one PID of the
container's pids limit and ~50 KiB of memory of its own (the program is one shared memfd).
A request the parked start cannot carry (over REQUEST_LIMIT) and an exec with none parked
start runc as before.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rune.agent.runners.base import CommandUnavailable
from rune.agent.runners.process import Child, PipeExecution, PtyExecution, start_on_pipes
from rune.agent.runners.runc_detached import abandon, adopt, is_terminal_master, read_available
from rune.agent.runners.spawn import readable

from rune.errors import Internal
from rune.models import ExecOpen

if TYPE_CHECKING:
    from rune.agent.runners.runc_exec import PidFiles

log = logging.getLogger(__name__)

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rune-parked")
PARKED_IDLE = 600.0  # default: seconds a parked start waits unused before it is let go
ANSWER_WAIT = 2.0  # seconds for a parked start to run the command or say why not (~1 ms)
PARK_REST = 600.0  # seconds without parking in a container whose parked start failed
REQUEST_LIMIT = 128 * 1024  # under parked.c's buffer and a datagram socket's send buffer
PARK_WITHIN = 1.0  # seconds into an exec that still runs, its container's next is parked
PARK_SETTLE = 0.02  # seconds after an exec's end: its last output and exit go out first
MAX_PARKED = 256  # containers with a parked start, least recently used let go first

_REQUEST = struct.Struct("=6I")  # magic, flags, cols, rows, argc, envc (parked.c)
_FAILURE = struct.Struct("=Ii")  # stage, errno
_MAGIC = 0x31504E52
_TTY = 1
_STAGE_REQUEST, _STAGE_CHDIR, _STAGE_TERMINAL, _STAGE_LOOKUP, _STAGE_EXEC = range(1, 6)


def sealed_program(path: str = PROGRAM) -> int:
    """The program as a read-only descriptor of a sealed memfd (what runc will exec)."""
    with open(path, "rb") as f:
        data = f.read()
    memfd = os.memfd_create("rune-parked", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(memfd, view):]
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        return os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(memfd)


def encode_request(request: ExecOpen) -> bytes | None:
    """The request as parked.c reads it, or None where it cannot carry it (too large, a
    NUL inside a word: runc's route says what is wrong with those)."""
    env = dict(request.env)
    if request.tty:
        env.setdefault("TERM", "xterm-256color")  # as the other routes
    overrides = [f"{key}={value}" for key, value in env.items()]
    words = [request.workdir or "", *request.argv, *overrides]
    try:
        encoded = [os.fsencode(word) for word in words]
    except (TypeError, ValueError):
        return None
    if any(b"\0" in word for word in encoded) or not request.argv or (
            request.workdir and not request.workdir.startswith("/")):
        return None
    head = _REQUEST.pack(_MAGIC, _TTY if request.tty else 0, request.width or 80,
                         request.height or 24, len(request.argv), len(overrides))
    payload = head + b"".join(word + b"\0" for word in encoded)
    return payload if len(payload) <= REQUEST_LIMIT else None


def failure(data: bytes, argv0: str, workdir: str) -> Exception:
    """parked.c's report of a start it could not make, in the words runc would use. Only
    its stage and errno are taken: the names in the message are the ones the agent sent
    (a start tampered with inside the container could report any bytes at all)."""
    if len(data) < _FAILURE.size:
        return Internal("the parked start in the container failed without a word")
    stage, error = _FAILURE.unpack_from(data)
    try:
        reason = os.strerror(error)
    except ValueError:
        reason = f"error {error}"
    reason = reason[:1].lower() + reason[1:]  # Go's wording, as runc's messages
    if stage == _STAGE_CHDIR:
        return CommandUnavailable(126, f'chdir to cwd ("{workdir}") set in config.json '
                                       f"failed: {reason}")
    if stage == _STAGE_LOOKUP:
        if "/" not in argv0:
            return CommandUnavailable(127, f'exec: "{argv0}": executable file not found '
                                           "in $PATH")
        if error in (errno.EACCES, errno.EISDIR):
            return CommandUnavailable(126, f'exec: "{argv0}": {reason}')
        return CommandUnavailable(127 if error == errno.ENOENT else 126,
                                  f'exec: "{argv0}": stat {argv0}: {reason}')
    if stage == _STAGE_EXEC:
        return CommandUnavailable(127 if error == errno.ENOENT else 126,
                                  f'exec: "{argv0}": {reason}')
    if stage == _STAGE_TERMINAL:
        return NotStarted(f"the container's terminal: {reason}")
    return NotStarted(f"it refused the request: {reason}")


def parked_pids() -> list[int]:
    """The host PIDs of every start parked on this host now (their name: rune-parked)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", "rb") as f:
                    if f.read().strip() == b"rune-parked":
                        found.append(int(entry))
            except OSError:
                pass
    return found


class NotStarted(Internal):
    """The parked start failed before the command ran: runc may start it instead."""


def still_parked(pid: int) -> bool:
    """pid has not become the command: its program is still rune-parked's memfd (which
    only its own exec changes)."""
    try:
        return os.readlink(f"/proc/{pid}/exe").startswith("/memfd:rune-parked")
    except OSError:
        return False


def spawn_runc(argv: list[str], stdio: tuple[int, int, int], passed: tuple[int, ...],
               idle: bool = False) -> int:
    """runc started with posix_spawn (no fork of the agent), stdio on 0-2 and `passed`
    on 3, 4, … for --preserve-fds, in a session of its own; its PID. idle: it and what it
    starts run only on a CPU that nothing else wants (SCHED_IDLE, where the agent may
    set it and take it back: CAP_SYS_NICE)."""
    lifted = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(passed)) for fd in passed]
    # posix_spawn's own scheduler attribute takes no SCHED_IDLE (glibc): the calling
    # thread switches for the spawn, and its child inherits the policy.
    was = (os.sched_getscheduler(0), os.sched_getparam(0)) if idle and _may_renice() \
        else None
    try:
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
        actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(lifted)]
        if was is not None:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return os.posix_spawn(argv[0], argv, {"PATH": os.environ.get("PATH", os.defpath)},
                              file_actions=actions, setsid=True)
    finally:
        if was is not None:
            os.sched_setscheduler(0, *was)
        for fd in lifted:
            os.close(fd)


@functools.cache
def _may_renice() -> bool:
    """CAP_SYS_NICE is effective: a policy lowered can be raised again."""
    try:
        with open("/proc/self/status") as f:
            effective = next(line for line in f if line.startswith("CapEff:"))
        return bool(int(effective.split()[1], 16) >> 23 & 1)
    except (OSError, StopIteration, ValueError):
        return False


def _schedule_as_agent(pid: int) -> None:
    """The parked start, started idle, scheduled as any command is (the agent's own
    policy and nice), before it becomes one."""
    if not _may_renice():
        return  # never lowered
    try:
        os.sched_setscheduler(pid, os.sched_getscheduler(0), os.sched_getparam(0))
    except OSError as exc:
        raise Internal(f"cannot reschedule the parked start: {exc.strerror}") from None


@dataclass
class _Parked:
    command: Child  # rune-parked now, the command once it is told
    control: socket.socket
    expiry: asyncio.TimerHandle


class ParkedStarts:
    """One parked start per container that has had an exec; execs take them."""

    def __init__(self, runc_argv: Callable[[str, str], list[str]], pids: PidFiles,
                 idle: float = PARKED_IDLE) -> None:
        self._runc_argv = runc_argv  # (container, pid file) -> its `runc exec -d …`
        self._pids = pids
        self._idle = idle
        self._program = sealed_program()
        self._null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._parked: dict[str, _Parked] = {}
        self._parking: dict[str, asyncio.Task] = {}
        self._resting: dict[str, float] = {}  # container -> loop time it may park again
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        for task in self._parking.values():
            task.cancel()
        for cid in list(self._parked):
            self._let_go(cid)
        for fd in (self._program, self._null):
            os.close(fd)

    # --- parking --------------------------------------------------------------------
    def park(self, container_id: str,
             after: PipeExecution | PtyExecution | None = None) -> None:
        """Parks the container's next start in the background, unless one is there or on
        its way; `after` (the exec just started): once it has ended, or has run
        PARK_WITHIN seconds, so that a short command's end reaches its caller first."""
        if container_id in self._parked or container_id in self._parking:
            return
        if self._resting.get(container_id, 0.0) > self._loop.time():
            return
        self._resting.pop(container_id, None)
        task = self._loop.create_task(self._park(container_id, after))
        self._parking[container_id] = task
        task.add_done_callback(functools.partial(self._parked_or_not, container_id))

    def _parked_or_not(self, container_id: str, task: asyncio.Task) -> None:
        self._parking.pop(container_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.warning("no start parked in %s: %s", container_id[:12], task.exception())

    async def _park(self, container_id: str,
                    after: PipeExecution | PtyExecution | None) -> None:
        if after is not None:
            try:
                await asyncio.wait_for(asyncio.shield(after.wait()), PARK_WITHIN)
                await asyncio.sleep(PARK_SETTLE)
            except Exception:  # noqa: BLE001 - its end is the session's business
                pass
        pid_file, known = self._pids.new()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET
                                         | socket.SOCK_CLOEXEC)
        stderr_r, stderr_w = os.pipe()
        try:
            argv = self._runc_argv(container_id, pid_file)
            # Background work: it yields the CPU to every exec and command running now.
            runc = Child(spawn_runc(argv, (self._null, self._null, stderr_w),
                                    (self._program, theirs.fileno()), idle=True))
            os.close(stderr_w)
            stderr_w = -1
            theirs.close()
            code, _ = await runc.wait()
            if code != 0:
                said = read_available(stderr_r).decode(errors="replace")
                log.debug("no start parked in %s: runc %d: %s", container_id[:12], code,
                          said.strip()[:300])
                ours.close()
                return
            self._pids.learn(pid_file)
            command = adopt(known)
            _schedule_as_agent(command.pid)
        except BaseException:
            self._pids.learn(pid_file)
            abandon(known)
            ours.close()
            raise
        finally:
            theirs.close()
            for fd in (stderr_r, stderr_w):
                if fd >= 0:
                    os.close(fd)
            self._pids.forget(pid_file)
        ours.setblocking(False)
        self._parked[container_id] = _Parked(
            command, ours, self._loop.call_later(self._idle, self._let_go, container_id))
        while len(self._parked) > MAX_PARKED:
            self._let_go(next(iter(self._parked)))

    def _let_go(self, container_id: str) -> None:
        """The parked start closes its socket's end, so rune-parked leaves (exit 0) and is
        reaped as the agent's child."""
        parked = self._parked.pop(container_id, None)
        if parked is not None:
            parked.expiry.cancel()
            parked.control.close()

    def _take(self, container_id: str) -> _Parked | None:
        parked = self._parked.pop(container_id, None)
        if parked is None:
            return None
        parked.expiry.cancel()
        if parked.command.returncode is not None:  # gone with its container, or killed
            parked.control.close()
            return None
        return parked

    # --- taking -----------------------------------------------------------------------
    async def take(self, container_id: str, request: ExecOpen,
                   stdout_size: int) -> PipeExecution | PtyExecution | None:
        """The command started by the container's parked start; None where there is none
        to take (runc starts it)."""
        payload = encode_request(request)
        parked = self._take(container_id) if payload is not None else None
        if parked is None:
            return None
        try:
            if request.tty:
                master = await self._ask(parked, payload, (), request)
                return PtyExecution(parked.command, master)

            async def start(stdio: tuple[int, int, int], _stderr: int) -> Child:
                await self._ask(parked, payload, stdio, request)
                return parked.command

            return await start_on_pipes(start, stdout_size)
        except CommandUnavailable:  # the command's own failure, as runc would have said
            self._failed(parked)
            raise
        except NotStarted as exc:  # the start failed, not the command: runc's turn
            self._failed(parked)
            self._rest(container_id, exc)
            return None
        except BaseException:
            self._failed(parked)
            raise
        finally:
            parked.control.close()

    def _rest(self, container_id: str, why: Exception) -> None:
        """A parked start that failed (stopped, killed or tampered with from inside the
        container): this exec starts runc, and nothing is parked there for PARK_REST."""
        log.warning("parked start in %s failed (%s): starting runc, none parked there for "
                    "%.0f s", container_id[:12], why, PARK_REST)
        self._resting[container_id] = self._loop.time() + PARK_REST

    async def _ask(self, parked: _Parked, payload: bytes, stdio: tuple[int, ...],
                   request: ExecOpen) -> int:
        """Sends the request; the terminal master it sends back (-1 without a TTY) once
        the command runs (its end of the socket closes on exec)."""
        control = parked.control
        try:
            socket.send_fds(control, [payload], list(stdio))
        except OSError as exc:
            raise NotStarted(f"it is gone: {exc.strerror}") from None
        master = -1
        try:
            async with asyncio.timeout(ANSWER_WAIT):
                while True:
                    await readable(self._loop, control.fileno())
                    data, fds, _, _ = socket.recv_fds(control, 8192, 4)
                    for fd in fds:
                        if master < 0 and data == b"T" and is_terminal_master(fd):
                            master = fd
                        else:
                            os.close(fd)
                    if not data:
                        break
                    if data != b"T":
                        raise failure(data, request.argv[0], request.workdir)
        except TimeoutError:
            if still_parked(parked.command.pid):
                raise NotStarted(f"no answer in {ANSWER_WAIT:.0f} s") from None
            raise Internal(f"the container's parked start ran the command but did not "
                           f"answer in {ANSWER_WAIT:.0f} s") from None
        except BaseException:
            if master >= 0:
                os.close(master)
            raise
        if stdio == () and master < 0:
            raise Internal("the container's parked start sent no terminal")
        return master

    @staticmethod
    def _failed(parked: _Parked) -> None:
        """A start that did not become the command is made to go; its Child reaps it
        whenever it does (a frozen container's only once thawed)."""
        if parked.command.returncode is None:
            try:
                os.kill(parked.command.pid, 9)
            except OSError:
                pass
