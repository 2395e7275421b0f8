"""A container's non-TTY exec run by the container's own runtime (runc), not relayed by the engine.

`docker exec` asks the engine, which asks containerd's shim, which runs `runc exec` and
copies every byte of output through the shim and the engine (two more processes, ~7 s
of CPU per GiB here). The agent runs on the container's host as root, so it can ask
the same runc the same thing: `runc exec` joins the container exactly as the shim's
call does — its namespaces, cgroup, capabilities, seccomp filter, AppArmor profile, user
and environment all come from the container's own config.json — and the output flows
from the command's pipes to the agent with nothing in between but runc's splice.

Only where this can be the same exec: a container the engine runs with runc, whose state
is under this host's runc root (`<root>/<id>/state.json`; another runtime, a remote or
rootless engine has none), a running container, and no TTY (a terminal needs the engine's
console; docker_exec.py does those). The engine does not learn of these execs (no exec
id in `docker inspect`, no exec events); rune's own audit has every one.

runc stays the command's parent: it reports the exit code (128+N for death by signal
N) and forwards what it is sent; the command's host PID, from runc's --pid-file, is what
signals and kills go to, since the command leads its own session and process group.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import signal
import tempfile

from rune.agent.runners.docker_exec import (
    process_tree,
    short_reason,
    signal_quietly,
    start_failure_code,
)
from rune.agent.runners.process import PipeExecution, pipe_size, start_pipes
from rune.agent.runners.spawn import ChildPlan

from rune.models import ExecOpen

log = logging.getLogger(__name__)

START_FAILED = b"exec failed: "  # runc's one line on stderr when the command did not start
RUNC_FAILED = 255
START_CHECK_WAIT = 2.0


class RuncExecution:
    """runc in front of the command: pipes as a process runner's, signals to the command."""

    tty = False

    def __init__(self, pipes: PipeExecution, pid_file: str) -> None:
        self._pipes = pipes
        self._runc = pipes.pid
        self._pid_file = pid_file
        self.pid = 0
        self.read_stdout = pipes.read_stdout
        self.write_stdin = pipes.write_stdin
        self.close_stdin = pipes.close_stdin
        self._start_checked = asyncio.Event()
        self._start_status: tuple[int, int] | None = None
        self._killed_by = 0

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
            try:
                with open(self._pid_file, "rb") as f:
                    self.pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
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
        self._kill_tree()

    def _kill_tree(self) -> None:
        pid = self._command_pid()
        if pid:
            signal_quietly(pid, signal.SIGKILL, group=True)
            for member in process_tree(pid):
                signal_quietly(member, signal.SIGKILL, group=False)
        signal_quietly(self._runc, signal.SIGKILL, group=False)  # a command that never started

    def close(self) -> None:
        if self._pipes.child.returncode is None:
            self._kill_tree()
        elif self._command_pid():
            signal_quietly(self.pid, signal.SIGKILL, group=True)  # the command's background
        self._pipes.close()
        try:
            os.unlink(self._pid_file)
        except OSError:
            pass


class RuncExec:
    """Finds runc and its state for the engine's containers; starts execs through it."""

    def __init__(self, root: str, binary: str = "runc") -> None:
        self.root = root
        self.binary = shutil.which(binary) or ""
        self._pids = ""
        self._count = itertools.count()

    def start(self) -> bool:
        """Usable here: runc found, its root readable (root only), a place for PID files."""
        if not self.binary or os.geteuid() != 0 or not os.path.isdir(self.root):
            log.info("containers' non-TTY execs go through the engine (runc %s, root %s)",
                     self.binary or "not found", self.root)
            return False
        self._pids = tempfile.mkdtemp(prefix="rune-runc-")
        return True

    def stop(self) -> None:
        if self._pids:
            shutil.rmtree(self._pids, ignore_errors=True)
            self._pids = ""

    def runs(self, container_id: str) -> bool:
        """This container's exec can be runc's: it has state under this root."""
        return bool(self._pids) and container_id.isalnum() and os.path.isfile(
            os.path.join(self.root, container_id, "state.json"))

    async def exec(self, container_id: str, request: ExecOpen) -> RuncExecution:
        pid_file = os.path.join(self._pids, f"{next(self._count)}.pid")
        argv = [self.binary, "--root", self.root, "--log", os.devnull, "exec",
                "--pid-file", pid_file]
        if request.workdir:
            argv += ["--cwd", request.workdir]
        for key, value in request.env.items():
            argv += ["--env", f"{key}={value}"]
        # request.user is who asked (for audit): the command runs as the container's user.
        argv += [container_id, *request.argv]
        plan = ChildPlan(argv=argv, env={"PATH": os.environ.get("PATH", os.defpath)},
                         cwd="/", die_with=os.getpid())
        pipes = await start_pipes(plan, pipe_size(request.window))
        return RuncExecution(pipes, pid_file)
