"""A container's exec run by the container's own runtime (runc), not relayed by the engine.

`docker exec` asks the engine, which asks containerd's shim, which runs `runc exec` and
copies every byte of output through the shim and the engine (two more processes, ~7 s
of CPU per GiB here). The agent runs on the container's host as root, so it can ask
the same runc the same thing: `runc exec` joins the container exactly as the shim's
call does — its namespaces, cgroup, capabilities, seccomp filter, AppArmor profile, user
and environment all come from the container's own config.json — and the output flows
from the command's pipes to the agent with nothing in between but runc's own copy
(runc passes a non-TTY command pipes of its own and copies them to its stdio). A TTY
exec gets the container's terminal itself, with no copy at all (runc_console.py).

Only where this can be the same exec: a container the engine runs with runc, whose state
is under this host's runc root (`<root>/<id>/state.json`; another runtime, a remote or
rootless engine has none), a running container; for a TTY, an agent that adopts what
runc leaves (reaper.py) on an engine that would size the terminal after the start too
(API before 1.42; docker.py decides). The engine does not learn of these execs (no exec
id in `docker inspect`, no exec events); rune's own audit has every one.

Without a TTY runc stays the command's parent: it reports the exit code (128+N for death by signal
N) and forwards what it is sent; the command's host PID, from runc's --pid-file, is what
signals and kills go to, since the command leads its own session and process group.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import os
import shutil
import signal
import struct
import tempfile

from rune.agent.runners.docker_exec import (
    START_CHECK_WAIT,
    process_tree,
    short_reason,
    signal_quietly,
    start_failure_code,
    stat_fields,
)
from rune.agent.runners.process import PipeExecution, PtyExecution, pipe_size, start_pipes
from rune.agent.runners.reaper import REAPER
from rune.agent.runners.runc_console import start_console_exec
from rune.agent.runners.spawn import ChildPlan

from rune.models import ExecOpen

log = logging.getLogger(__name__)

START_FAILED = b"exec failed: "  # runc's one line on stderr when the command did not start
RUNC_FAILED = 255
_LIBC = ctypes.CDLL(None, use_errno=True)
_IN_MOVED_TO = 0x80
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


def _read_pid(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _parent_of(pid: int) -> int:
    try:
        return int(stat_fields(pid)[1])
    except (OSError, ValueError, IndexError):
        return 0


class PidFiles:
    """The directory of runc's --pid-files, watched with inotify: each exec learns its
    command's PID the moment runc renames the file into place, without asking again."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="rune-runc-")
        self._count = itertools.count()
        self._waiting: dict[str, asyncio.Future[int]] = {}
        self._adopted: set[str] = set()
        self._loop = asyncio.get_running_loop()
        self._fd = _LIBC.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0 or _LIBC.inotify_add_watch(self._fd, os.fsencode(self.dir),
                                                   _IN_MOVED_TO) < 0:
            error = ctypes.get_errno()
            self.close()
            raise OSError(error, f"inotify: {os.strerror(error)}")
        self._loop.add_reader(self._fd, self.drain)
        REAPER.before_reaping(self.drain)

    def new(self, adopted: bool = False) -> tuple[str, asyncio.Future[int]]:
        """A fresh path for runc's --pid-file and the future of the PID it will hold.
        `adopted`: the command will be the agent's child once runc leaves (runc exec -d),
        so its PID is owned (reaper.py) from the moment it is known."""
        name = f"{next(self._count)}.pid"
        known = self._loop.create_future()
        self._waiting[name] = known
        if adopted:
            self._adopted.add(name)
        return os.path.join(self.dir, name), known

    def path(self, suffix: str) -> str:
        """A fresh path in this private directory (runc's console sockets)."""
        return os.path.join(self.dir, f"{next(self._count)}.{suffix}")

    def forget(self, path: str) -> None:
        name = os.path.basename(path)
        self._adopted.discard(name)
        known = self._waiting.pop(name, None)
        if known is not None:
            known.cancel()
        try:
            os.unlink(path)
        except OSError:
            pass

    def drain(self) -> None:
        """Takes what inotify has queued: each PID file renamed into place."""
        if self._fd < 0:
            return
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset + _INOTIFY_EVENT.size <= len(data):
            length = _INOTIFY_EVENT.unpack_from(data, offset)[3]
            start = offset + _INOTIFY_EVENT.size
            name = data[start:start + length].rstrip(b"\0").decode(errors="replace")
            offset = start + length
            known = self._waiting.pop(name, None)
            if known is not None and not known.done():
                pid = _read_pid(os.path.join(self.dir, name))
                if pid and name in self._adopted:
                    REAPER.own(pid)
                known.set_result(pid)
            self._adopted.discard(name)

    def close(self) -> None:
        REAPER.forget_hook(self.drain)
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        for known in self._waiting.values():
            known.cancel()
        self._waiting.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


class RuncExecution:
    """runc in front of the command: pipes as a process runner's, signals to the command."""

    tty = False

    def __init__(self, pipes: PipeExecution, pid_file: str, pid_known: asyncio.Future[int],
                 pid_files: PidFiles, exit_grace: float) -> None:
        self._pipes = pipes
        self._runc = pipes.pid
        self._pid_file = pid_file
        self._pid_known = pid_known
        self._pid_files = pid_files
        self._exit_grace = exit_grace
        self.pid = 0
        self.read_stdout = pipes.read_stdout
        self.write_stdin = pipes.write_stdin
        self.close_stdin = pipes.close_stdin
        self._start_checked = asyncio.Event()
        self._start_status: tuple[int, int] | None = None
        self._killed_by = 0
        self._following = asyncio.get_running_loop().create_task(self._follow_command())

    # --- the command's end --------------------------------------------------------------
    async def _follow_command(self) -> None:
        """runc waits for its own pipes to drain before it leaves, so a background child
        still holding stdout would keep the session open after the command is gone. Once
        the command has ended and runc has not followed within exit_grace, the command's
        leftovers are killed (as a process runner's are when its session closes), runc's
        pipes end, and runc reports the command's exit code."""
        runc_left = asyncio.ensure_future(self._pipes.wait())
        await asyncio.wait((self._pid_known, runc_left), return_when=asyncio.FIRST_COMPLETED)
        if runc_left.done() or self._pid_known.cancelled():
            return
        pid = self._pid_known.result()
        if not pid:
            return
        self.pid = pid
        await self._until_gone(pid, runc_left)
        try:
            await asyncio.wait_for(asyncio.shield(runc_left), self._exit_grace)
        except TimeoutError:
            self._kill_command(runc_too=False)

    async def _until_gone(self, pid: int, runc_left: asyncio.Future) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # already gone
        loop = asyncio.get_running_loop()
        gone = loop.create_future()
        loop.add_reader(pidfd, lambda: gone.done() or gone.set_result(None))
        try:
            if _parent_of(pid) == self._runc:  # still runc's command, not a reused PID
                await asyncio.wait((gone, runc_left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)

    def _kill_command(self, runc_too: bool) -> None:
        """SIGKILL to the command's group and to everything under runc: the command's tree
        and the orphans runc took in as subreaper; to runc itself too when asked (a
        command that never started)."""
        pid = self._command_pid()
        if pid:
            signal_quietly(pid, signal.SIGKILL, group=True)
        for member in process_tree(self._runc):
            if member != self._runc or runc_too:
                signal_quietly(member, signal.SIGKILL, group=False)

    # --- the command's start ------------------------------------------------------------
    async def read_stderr(self, n: int) -> bytes:
        data = await self._pipes.read_stderr(n)
        if self._start_checked.is_set():
            return data
        try:
            if data.startswith(START_FAILED) and await self._never_started():
                reason = short_reason(data.decode(errors="replace").removeprefix(
                    "exec failed: ").removeprefix("unable to start container process: "))
                self._start_status = (start_failure_code(reason), 0)
                return f"rune: {reason}\n".encode()
        finally:
            self._start_checked.set()
        return data

    async def _never_started(self) -> bool:
        """runc said exec failed: true when it left with 255 and never had a command.
        runc leaves at once after a failed start; a command that printed those words
        itself is still running after START_CHECK_WAIT, and its stderr flows on."""
        try:
            code, _ = await asyncio.wait_for(self._pipes.wait(), START_CHECK_WAIT)
        except TimeoutError:
            return False
        return code == RUNC_FAILED and not self._command_pid()

    def _command_pid(self) -> int:
        if not self.pid:
            known = self._pid_known
            done = known.done() and not known.cancelled()
            self.pid = known.result() if done else _read_pid(self._pid_file)
        return self.pid

    async def wait(self) -> tuple[int, int]:
        code, sig = await self._pipes.wait()
        if code == RUNC_FAILED and not self._start_checked.is_set():
            try:  # runc's 255 is also any start failure: its message on stderr tells
                await asyncio.wait_for(self._start_checked.wait(), START_CHECK_WAIT)
            except TimeoutError:
                pass
        if self._start_status is not None:
            return self._start_status
        if self._killed_by and code == 128 + self._killed_by:
            sig = self._killed_by
        return code, sig

    # --- signals ------------------------------------------------------------------------
    def resize(self, width: int, height: int) -> None:
        pass

    def signal(self, signum: int) -> None:
        pid = self._command_pid()
        if pid:
            signal_quietly(pid, signum, group=True)
        else:  # not started yet: runc forwards what it gets once the command runs
            signal_quietly(self._runc, signum, group=False)

    async def terminate(self, grace: float) -> None:
        pid = self._command_pid()
        if pid:
            signal_quietly(pid, signal.SIGTERM, group=True)
            signal_quietly(pid, signal.SIGCONT, group=True)
            try:
                await asyncio.wait_for(self._pipes.wait(), grace)
            except TimeoutError:
                pass
        await self.kill()

    async def kill(self) -> None:
        self._killed_by = signal.SIGKILL
        self._kill_command(runc_too=True)

    def close(self) -> None:
        if self._pipes.child.returncode is None:
            self._kill_command(runc_too=True)
        elif self._command_pid():
            signal_quietly(self.pid, signal.SIGKILL, group=True)  # the command's background
        self._following.cancel()
        self._pipes.close()
        self._pid_files.forget(self._pid_file)


class RuncExec:
    """Finds runc and its state for the engine's containers; starts execs through it."""

    def __init__(self, root: str, binary: str = "runc", exit_grace: float = 1.0) -> None:
        self.root = root
        self.binary = shutil.which(binary) or ""
        self.exit_grace = exit_grace
        self._pids: PidFiles | None = None

    def start(self) -> bool:
        """Usable here: runc found, its root readable (root only), a place for PID files.
        Called on the event loop."""
        if not self.binary or os.geteuid() != 0 or not os.path.isdir(self.root):
            log.info("containers' non-TTY execs go through the engine (runc %s, root %s)",
                     self.binary or "not found", self.root)
            return False
        try:
            self._pids = PidFiles()
        except OSError as exc:
            log.warning("containers' non-TTY execs go through the engine: %s", exc)
            return False
        return True

    def stop(self) -> None:
        if self._pids is not None:
            self._pids.close()
            self._pids = None

    def runs(self, container_id: str) -> bool:
        """This container's exec can be runc's: it has state under this root."""
        return self._pids is not None and container_id.isalnum() and os.path.isfile(
            os.path.join(self.root, container_id, "state.json"))

    def takes_tty(self) -> bool:
        """TTY execs can be runc's: the agent adopts what `runc exec -d` leaves (reaper.py)."""
        return self._pids is not None and REAPER.enabled

    def _argv(self, container_id: str, request: ExecOpen, *flags: str) -> list[str]:
        argv = [self.binary, "--root", self.root, "--log", os.devnull, "exec", *flags]
        env = dict(request.env)
        if request.tty:
            env.setdefault("TERM", "xterm-256color")  # as the engine route's exec
        if request.workdir:
            argv += ["--cwd", request.workdir]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        # request.user is who asked (for audit): the command runs as the container's user.
        return [*argv, container_id, *request.argv]

    async def exec(self, container_id: str,
                   request: ExecOpen) -> RuncExecution | PtyExecution:
        if request.tty:
            return await self._exec_tty(container_id, request)
        pid_file, pid_known = self._pids.new()
        argv = self._argv(container_id, request, "--pid-file", pid_file)
        plan = ChildPlan(argv=argv, env={"PATH": os.environ.get("PATH", os.defpath)},
                         cwd="/", die_with=os.getpid())
        try:
            pipes = await start_pipes(plan, pipe_size(request.window))
        except BaseException:
            self._pids.forget(pid_file)
            raise
        return RuncExecution(pipes, pid_file, pid_known, self._pids, self.exit_grace)

    async def _exec_tty(self, container_id: str, request: ExecOpen) -> PtyExecution:
        """The container's terminal held by the agent (runc_console.py)."""
        pids = self._pids
        pid_file, pid_known = pids.new(adopted=True)
        console = pids.path("console")
        argv = self._argv(container_id, request, "-d", "--tty", "--console-socket", console,
                          "--pid-file", pid_file)
        try:
            return await start_console_exec(argv, console, pid_known, pids.drain,
                                            request.width or 80, request.height or 24)
        finally:
            pids.forget(pid_file)
