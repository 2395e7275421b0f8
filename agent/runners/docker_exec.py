"""One command run through the Engine's exec API, its stream read on the event loop.

Output comes through the exec's own connection (engine_stream.ExecStream); the exit code
from the engine's `exec_die` event, or from one inspect once the output has ended. The
engine has no call to signal an exec, so signals and kills go to the exec's process on
the host (its PID from the exec's inspect, asked for only when needed); the agent runs as
root in the host's PID space.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal

from rune.agent.runners.engine_api import EngineAPI
from rune.agent.runners.engine_stream import ExecStream

log = logging.getLogger(__name__)

START_FAILED = b"OCI runtime exec failed"
ENGINE_START_FAILED = 126  # the exit code the engine gives any exec that did not start
START_CHECK_WAIT = 2.0
EVENT_GRACE = 0.05  # after EOF, how long exec_die may take before one inspect asks instead
EXIT_TRIES = 8  # inspects after EOF if neither event nor inspect told (engine events down)
PID_TRIES = 50
RESIZE_TRIES = 5
_background: set[asyncio.Task] = set()  # kills outliving their execution's close()


def start_failure_code(message: str) -> int:
    """The shell's code for a command that could not start: 127 missing, 126 otherwise."""
    if "chdir" in message:
        return 126
    if "executable file not found" in message or "no such file or directory" in message:
        return 127
    return 126


def short_reason(text: str) -> str:
    """'OCI runtime exec failed: exec failed: …: exec: "x": not found: unknown' → 'exec: "x": …'."""
    text = text.strip()
    match = re.search(r'exec: "[^"]*": .*', text) or re.search(r"chdir to cwd .*", text)
    reason = match.group(0) if match else text
    return reason.removesuffix(": unknown")


def stat_fields(pid: int | str) -> list[bytes]:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, session, tty, tpgid, …"""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2:].split()


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, read from /proc (children of a dead parent included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = stat_fields(entry)
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo and len(tree) < 100000:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def foreground_group(pid: int) -> int:
    """The foreground process group of pid's terminal (tpgid in /proc/pid/stat), else pid."""
    try:
        tpgid = int(stat_fields(pid)[5])
    except (OSError, ValueError, IndexError):
        return pid
    return tpgid if tpgid > 0 else pid


def signal_quietly(pid: int, signum: int, group: bool) -> None:
    """Sends signum to pid (or its group); one already gone or not ours is no error."""
    try:
        os.killpg(pid, signum) if group else os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass




class DockerExecution:
    """An exec's I/O over its own connection; exit from the exec_die event or inspect."""

    def __init__(self, exec_id: str, stream: ExecStream, api: EngineAPI) -> None:
        self.exec_id = exec_id
        self.tty = stream.tty
        self.pid = 0
        self._stream = stream
        self._api = api
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[tuple[int, int]] = self._loop.create_future()
        self._start_checked = asyncio.Event()
        self._start_message = b""
        self._start_status: tuple[int, int] | None = None
        self._pending_signals: list[int] = []
        self._pid_lookup: asyncio.Task | None = None
        self._killed_by = 0
        self._size: tuple[int, int] | None = None
        self._resizing: asyncio.Task | None = None
        self._tasks = [self._loop.create_task(self._exit_after_eof())]

    # --- output -----------------------------------------------------------------------
    async def read_stdout(self, n: int) -> bytes:
        data = await self._stream.stdout.read(n)
        if not self._start_checked.is_set():
            try:
                if data.startswith(START_FAILED):
                    message = await self._start_failed(data)
                    if message is not None:
                        if self.tty:
                            return message
                        self._start_message = message
                        return b""
            finally:
                self._start_checked.set()
        return data

    async def read_stderr(self, n: int) -> bytes:
        data = await self._stream.stderr.read(n)
        if data:
            return data
        await self._start_checked.wait()  # a failed start's message goes out on stderr
        message, self._start_message = self._start_message, b""
        return message

    async def _start_failed(self, text: bytes) -> bytes | None:
        """The engine writes a failed start (no such command…) as output: make it 127/126."""
        try:
            info = await self._api.exec_inspect(self.exec_id)
        except Exception:
            return None
        if info.get("Pid"):
            return None  # the command itself printed that
        reason = short_reason(text.decode(errors="replace"))
        self._start_status = (start_failure_code(reason), 0)
        self._finish(*self._start_status)
        return f"rune: {reason}\n".encode()

    # --- exit -------------------------------------------------------------------------
    def exec_died(self, code: int) -> None:
        """The engine's exec_die event: the command is gone."""
        self._finish(code, 0)

    def _finish(self, code: int, sig: int) -> None:
        if self._exit.done():
            return
        if self._killed_by and code == 128 + self._killed_by:
            sig = self._killed_by
        self._exit.set_result((code, sig))

    async def _exit_after_eof(self) -> None:
        """The output ended: exec_die normally follows within moments, else inspect tells."""
        await self._stream.ended
        delay = EVENT_GRACE
        for _ in range(EXIT_TRIES):
            try:
                await asyncio.wait_for(asyncio.shield(self._exit), delay)
                return
            except TimeoutError:
                pass
            try:
                info = await self._api.exec_inspect(self.exec_id)
            except Exception as exc:
                log.warning("exec %s: inspect failed: %s", self.exec_id[:12], exc)
                return
            if not info.get("Running") and info.get("ExitCode") is not None:
                self._finish(int(info["ExitCode"]), 0)
                return
            delay = min(delay * 4, 5.0)

    async def wait(self) -> tuple[int, int]:
        status = await asyncio.shield(self._exit)
        if status[0] == ENGINE_START_FAILED and not self._start_checked.is_set():
            # The engine says 126 for any failed start; the output tells 127 from 126.
            try:
                await asyncio.wait_for(self._start_checked.wait(), START_CHECK_WAIT)
            except TimeoutError:
                pass
        return self._start_status or status

    # --- input ------------------------------------------------------------------------
    async def write_stdin(self, data: bytes) -> None:
        await self._stream.write(data)

    async def close_stdin(self) -> None:
        if self.tty:
            await self.write_stdin(b"\x04")  # VEOF, what Ctrl+D sends
        else:
            self._stream.write_eof()  # the engine closes the command's stdin

    def resize(self, width: int, height: int) -> None:
        if not self.tty or width <= 0 or height <= 0:
            return
        self._size = (width, height)
        if self._resizing is None or self._resizing.done():
            self._resizing = self._loop.create_task(self._apply_size())

    async def initial_size(self, width: int, height: int) -> None:
        """Engines before API 1.42 take no size at create: resize right after start."""
        if self.tty and width > 0 and height > 0:
            self._size = (width, height)
            self._resizing = self._loop.create_task(self._apply_size())
            await asyncio.shield(self._resizing)

    async def _apply_size(self) -> None:
        """One resize call at a time, always ending at the latest size asked for."""
        applied, failures = None, 0
        while self._size != applied:
            size = self._size
            try:
                await self._api.exec_resize(self.exec_id, *size)
                applied = size
            except Exception as exc:
                # Right after start the engine may not have the process yet: retry, bounded.
                failures += 1
                if failures >= RESIZE_TRIES or self._exit.done():
                    log.debug("exec %s: resize failed: %s", self.exec_id[:12], exc)
                    return
                await asyncio.sleep(0.01 * 2 ** failures)

    # --- signals ----------------------------------------------------------------------
    async def _learn_pid(self) -> int:
        """The exec's host PID, asked of the engine once, when a signal first needs it."""
        if not self.pid:
            if self._pid_lookup is None:
                self._pid_lookup = self._loop.create_task(self._inspect_pid())
            await asyncio.shield(self._pid_lookup)
        return self.pid

    async def _inspect_pid(self) -> None:
        for attempt in range(PID_TRIES):
            try:
                info = await self._api.exec_inspect(self.exec_id)
            except Exception:
                return
            if info.get("Pid"):
                self.pid = int(info["Pid"])
                return
            if self._exit.done() or (info.get("ExitCode") is not None
                                     and not info.get("Running")):
                return
            await asyncio.sleep(min(0.005 * (attempt + 1), 0.05))  # not started yet

    def signal(self, signum: int) -> None:
        if self._exit.done():
            return
        if self.pid and not self._pending_signals:
            self._send(signum)
            return
        self._pending_signals.append(signum)
        if len(self._pending_signals) == 1:
            self._tasks.append(self._loop.create_task(self._deliver_pending()))

    async def _deliver_pending(self) -> None:
        await self._learn_pid()
        pending, self._pending_signals = self._pending_signals, []
        for signum in pending:
            if self.pid and not self._exit.done():
                self._send(signum)

    def _send(self, signum: int) -> None:
        if self.tty:
            signal_quietly(foreground_group(self.pid), signum, group=True)
        else:
            signal_quietly(self.pid, signum, group=True)  # the exec leads its own session and group

    def _kill_tree(self) -> None:
        if not self.pid:
            return
        signal_quietly(self.pid, signal.SIGKILL, group=True)
        for pid in process_tree(self.pid):
            signal_quietly(pid, signal.SIGKILL, group=False)

    async def terminate(self, grace: float) -> None:
        first = signal.SIGHUP if self.tty else signal.SIGTERM
        if not self._exit.done() and await self._learn_pid():
            signal_quietly(self.pid, first, group=True)
            signal_quietly(self.pid, signal.SIGCONT, group=True)
            try:
                await asyncio.wait_for(self.wait(), grace)
            except TimeoutError:
                pass
        await self.kill()

    async def kill(self) -> None:
        if not self._exit.done():
            await self._learn_pid()
        self._killed_by = signal.SIGKILL
        self._kill_tree()

    def close(self) -> None:
        if not self._exit.done():
            if self.pid:
                self._kill_tree()
            else:  # never signalled, so never looked up: look up, then kill
                task = self._loop.create_task(self.kill())
                _background.add(task)
                task.add_done_callback(_background.discard)
        elif self.pid:
            signal_quietly(self.pid, signal.SIGKILL, group=True)  # the command's background
        for task in self._tasks:
            task.cancel()
        self._stream.close()
