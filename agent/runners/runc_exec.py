"""A container's exec run by the container's own runtime (runc), not relayed by the engine.

`docker exec` asks the engine, which asks containerd's shim, which runs `runc exec` and
copies every byte of output through the shim and the engine (two more processes, ~7 s
of CPU per GiB here). The agent runs on the container's host as root, so it can ask
the same runc the same thing: `runc exec` joins the container exactly as the shim's
call does (its namespaces, cgroup, capabilities, seccomp filter, AppArmor profile, user
and environment all come from the container's own config.json). With `-d` runc leaves
once the command runs, and nothing stands between the command and the agent: without a
TTY the command writes into the agent's own pipes (runc passes its stdio through), with
one the agent holds the container's terminal (runc_detached.py). The command is then the
agent's child by adoption (reaper.py) and is run, signalled, killed and reaped as a
process instance's command is (process.PipeExecution / PtyExecution).

Only where this can be the same exec: a container the engine runs with runc, whose state
is under this host's runc root (`<root>/<id>/state.json`; another runtime, a remote or
rootless engine has none), a running container, an agent that adopts what runc leaves
(the agent program; reaper.py); for a TTY, an engine that would size the terminal after
the start too (API before 1.42; docker.py decides). The engine does not learn of these
execs (no exec id in `docker inspect`, no exec events); rune's own audit has every one.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import itertools
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable

from rune.agent.runners.parked import PARKED_IDLE, ParkedStarts
from rune.agent.runners.process import PipeExecution, PtyExecution, pipe_size
from rune.agent.runners.reaper import REAPER
from rune.agent.runners.runc_detached import start_terminal, start_with_pipes

from rune.models import ExecOpen

log = logging.getLogger(__name__)

_LIBC = ctypes.CDLL(None, use_errno=True)
_IN_MOVED_TO = 0x80
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


def _read_pid(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


class PidFiles:
    """The directory of runc's --pid-files, watched with inotify: each exec learns its
    command's PID the moment runc renames the file into place, without asking again."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="rune-runc-")
        self._count = itertools.count()
        self._waiting: dict[str, asyncio.Future[int]] = {}
        self._loop = asyncio.get_running_loop()
        self._fd = _LIBC.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0 or _LIBC.inotify_add_watch(self._fd, os.fsencode(self.dir),
                                                   _IN_MOVED_TO) < 0:
            error = ctypes.get_errno()
            self.close()
            raise OSError(error, f"inotify: {os.strerror(error)}")
        self._loop.add_reader(self._fd, self.drain)
        REAPER.before_reaping(self.drain)

    def new(self) -> tuple[str, asyncio.Future[int]]:
        """A fresh path for runc's --pid-file and the future of the PID it will hold. The
        command will be the agent's child once runc leaves (runc exec -d), so its PID is
        owned (reaper.py) from the moment it is known."""
        name = f"{next(self._count)}.pid"
        known = self._loop.create_future()
        self._waiting[name] = known
        return os.path.join(self.dir, name), known

    def _settle(self, name: str, pid: int) -> None:
        known = self._waiting.pop(name, None)
        if known is not None and not known.done():
            if pid:
                REAPER.own(pid)
            known.set_result(pid)

    def learn(self, path: str) -> None:
        """Once runc has left: the PID of `path` settled now, from what inotify queued or,
        should that have missed it (an overflowed queue), from the file itself."""
        self.drain()
        name = os.path.basename(path)
        if name in self._waiting and (pid := _read_pid(path)):
            self._settle(name, pid)

    def path(self, suffix: str) -> str:
        """A fresh path in this private directory (runc's console sockets)."""
        return os.path.join(self.dir, f"{next(self._count)}.{suffix}")

    def forget(self, path: str) -> None:
        known = self._waiting.pop(os.path.basename(path), None)
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
            if name in self._waiting:
                self._settle(name, _read_pid(os.path.join(self.dir, name)))

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


class RuncExec:
    """Finds runc and its state for the engine's containers; starts execs through it."""

    def __init__(self, root: str, binary: str = "runc", parked: bool = True,
                 parked_idle: float = PARKED_IDLE,
                 count_start: Callable[[str], None] | None = None) -> None:
        self.root = root
        self._count_start = count_start or (lambda route: None)  # "parked" or "runc", per exec
        self.binary = shutil.which(binary) or ""
        self._pids: PidFiles | None = None
        self._want_parked = parked
        self._parked_idle = parked_idle
        self.parked: ParkedStarts | None = None

    def start(self) -> bool:
        """Usable here: runc found, its root readable (root only), the agent adopting what
        runc leaves, a place for PID files. Called on the event loop."""
        if not self.binary or os.geteuid() != 0 or not os.path.isdir(self.root) \
                or not REAPER.enabled:
            log.info("containers' execs go through the engine (runc %s, root %s, %s)",
                     self.binary or "not found", self.root,
                     "adopting" if REAPER.enabled else "not a subreaper")
            return False
        try:
            self._pids = PidFiles()
        except OSError as exc:
            log.warning("containers' execs go through the engine: %s", exc)
            return False
        if self._want_parked:
            try:
                self.parked = ParkedStarts(self._park_argv, self._pids, self._parked_idle)
            except OSError as exc:  # not built (no C compiler at install), or no memfd
                log.info("containers' execs start runc each time: %s", exc)
        return True

    def stop(self) -> None:
        if self.parked is not None:
            self.parked.close()
            self.parked = None
        if self._pids is not None:
            self._pids.close()
            self._pids = None

    def runs(self, container_id: str) -> bool:
        """This container's exec can be runc's: it has state under this root."""
        return self._pids is not None and container_id.isalnum() and os.path.isfile(
            os.path.join(self.root, container_id, "state.json"))

    def _runc_exec(self, *flags: str) -> list[str]:
        return [self.binary, "--root", self.root, "--log", os.devnull, "exec", "--detach",
                *flags]

    def _park_argv(self, container_id: str, pid_file: str) -> list[str]:
        """runc's start of rune-parked (parked.py), passed on fd 3 with its socket on 4."""
        return [*self._runc_exec("--preserve-fds", "2", "--pid-file", pid_file),
                container_id, "/proc/self/fd/3", "rune-parked"]

    def _argv(self, container_id: str, request: ExecOpen, *flags: str) -> list[str]:
        argv = self._runc_exec(*flags)
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
                   request: ExecOpen) -> PipeExecution | PtyExecution:
        """The command started in the container and adopted: pipes, or its terminal.
        Taken from the container's parked start where there is one; the next is parked
        once this one runs."""
        began = time.perf_counter()
        started = None
        try:
            if self.parked is not None:
                started = await self.parked.take(container_id, request,
                                                 pipe_size(request.window))
            if started is not None:
                route, how = "parked", "parked start"
            else:
                started = await self._start(container_id, request)
                route, how = "runc", "runc" if self.parked is None else "runc (none parked)"
            self._count_start(route)
            log.debug("exec in %s: %s, %.1f ms", container_id[:12], how,
                      1000 * (time.perf_counter() - began))
            return started
        finally:
            if self.parked is not None:
                self.parked.park(container_id, started)

    async def _start(self, container_id: str,
                     request: ExecOpen) -> PipeExecution | PtyExecution:
        pids = self._pids
        pid_file, pid_known = pids.new()
        try:
            if request.tty:
                console = pids.path("console")
                argv = self._argv(container_id, request, "--tty", "--console-socket",
                                  console, "--pid-file", pid_file)
                return await start_terminal(argv, console, pid_known,
                                            functools.partial(pids.learn, pid_file),
                                            request.width or 80, request.height or 24)
            argv = self._argv(container_id, request, "--pid-file", pid_file)
            return await start_with_pipes(argv, pid_known,
                                          functools.partial(pids.learn, pid_file),
                                          pipe_size(request.window))
        finally:
            pids.forget(pid_file)
