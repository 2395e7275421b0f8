"""One command run through the Engine's exec API, over its hijacked socket, without blocking.

The engine has no call to signal an exec, so signals and kills go to the exec's process on
the host (its PID from the exec's inspect); the agent runs as root in the host's PID space.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import struct
from collections.abc import Awaitable, Callable

from rune import frames

log = logging.getLogger(__name__)

HEADER = struct.Struct(">BxxxI")  # stream id (0 stdin, 1 stdout, 2 stderr, 3 engine error), size
RECV_SIZE = frames.MAX_DATA
QUEUED_CHUNKS = 4  # per stream: with the reader stopped, the engine stops the command's writes
START_FAILED = b"OCI runtime exec failed"
PID_TRIES = 100
RESIZE_TRIES = 5

Inspect = Callable[[], Awaitable[dict]]
Resize = Callable[[int, int], Awaitable[None]]


class _Output:
    """One output stream: a few chunks queued, read back in pieces of at most n bytes."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUED_CHUNKS)
        self.pending: bytes | memoryview = b""
        self.eof = False

    async def read(self, n: int) -> bytes:
        if not self.pending:
            if self.eof:
                return b""
            chunk = await self.queue.get()
            if chunk is None:
                self.eof = True
                return b""
            if len(chunk) <= n:
                return chunk
            self.pending = memoryview(chunk)
        data, self.pending = bytes(self.pending[:n]), self.pending[n:]
        return data


def _demux(state: list, data: bytes, out: dict[int, list]) -> None:
    """Splits engine frames (header, payload) across reads; state: [header, stream, left]."""
    view = memoryview(data)
    while view:
        if state[2] == 0:
            need = HEADER.size - len(state[0])
            state[0] += view[:need]
            view = view[need:]
            if len(state[0]) == HEADER.size:
                state[1], state[2] = HEADER.unpack(state[0])
                state[0] = b""
            continue
        piece = view[:state[2]]
        view = view[len(piece):]
        state[2] -= len(piece)
        out.setdefault(state[1], []).append(piece)


def start_failure_code(message: str) -> int:
    """The shell's code for a command that could not start: 127 missing, 126 otherwise."""
    if "chdir" in message:
        return 126
    if "executable file not found" in message or "no such file or directory" in message:
        return 127
    return 126


def _short_reason(text: str) -> str:
    """'OCI runtime exec failed: exec failed: …: exec: "x": not found: unknown' → 'exec: "x": …'."""
    text = text.strip()
    match = re.search(r'exec: "[^"]*": .*', text) or re.search(r"chdir to cwd .*", text)
    reason = match.group(0) if match else text
    return reason.removesuffix(": unknown")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, read from /proc (children of a dead parent included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
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
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        tpgid = int(stat[stat.rfind(b")") + 2:].split()[5])
    except (OSError, ValueError, IndexError):
        return pid
    return tpgid if tpgid > 0 else pid


def _kill(pid: int, signum: int, group: bool) -> None:
    try:
        os.killpg(pid, signum) if group else os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


class DockerExecution:
    """An exec's I/O over the raw socket; exit from the engine's exec_die event or inspect."""

    def __init__(self, exec_id: str, sockio: object, tty: bool, inspect: Inspect,
                 resize: Resize) -> None:
        self.exec_id = exec_id
        self.tty = tty
        self.pid = 0
        self._sockio = sockio  # holds the HTTP response that owns the socket
        self._sock: socket.socket = sockio._sock
        self._sock.setblocking(False)
        self._inspect = inspect
        self._resize = resize
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[tuple[int, int]] = self._loop.create_future()
        self._streams = {1: _Output(), 2: _Output()}
        self._pending_signals: list[int] = []
        self._killed_by = 0
        self._size: tuple[int, int] | None = None
        self._resizing: asyncio.Task | None = None
        self._tasks = [self._loop.create_task(self._read()),
                       self._loop.create_task(self._learn_pid())]

    # --- output -----------------------------------------------------------------------
    async def read_stdout(self, n: int) -> bytes:
        return await self._streams[1].read(n)

    async def read_stderr(self, n: int) -> bytes:
        return await self._streams[2].read(n)

    async def _read(self) -> None:
        state: list = [b"", 0, 0]
        first = True
        ended = False
        while not ended:
            try:
                data = await self._loop.sock_recv(self._sock, RECV_SIZE)
            except OSError:
                data = b""
            if not data:
                break
            data, ended = self._more(data)
            out: dict[int, list] = {}
            if self.tty:
                out[1] = [data]
            else:
                _demux(state, data, out)
            if first and out:
                first = False
                if await self._start_failed(out):
                    continue
            for stream, pieces in out.items():
                if stream in (1, 2, 3):  # 3: the engine's own error text, shown as stderr
                    chunk = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    await self._streams[min(stream, 2)].queue.put(bytes(chunk))
        for output in self._streams.values():
            await output.queue.put(None)
        await self._exit_from_inspect()

    def _more(self, data: bytes) -> tuple[bytes, bool]:
        """Adds what else is already readable: few large frames, not one per engine write."""
        parts, total, ended = [data], len(data), False
        while total < RECV_SIZE:
            try:
                more = self._sock.recv(RECV_SIZE - total)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                ended = True
                break
            if not more:
                ended = True
                break
            parts.append(more)
            total += len(more)
        return (data if len(parts) == 1 else b"".join(parts)), ended

    async def _start_failed(self, out: dict[int, list]) -> bool:
        """The engine writes a failed start (no such command…) as output: make it 127/126."""
        text = b"".join(out.get(1, ()))
        if not text.startswith(START_FAILED):
            return False
        info = await self._inspect()
        if info.get("Pid"):
            return False  # the command itself printed that
        reason = _short_reason(text.decode(errors="replace"))
        message = f"rune: {reason}\n".encode()
        await self._streams[1 if self.tty else 2].queue.put(message)
        self._finish(start_failure_code(reason), 0)
        return True

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

    async def _exit_from_inspect(self) -> None:
        """The output ended: unless an event already told, the exec's inspect does."""
        for _ in range(PID_TRIES):
            if self._exit.done():
                return
            try:
                info = await self._inspect()
            except Exception as exc:
                log.warning("exec %s: inspect failed: %s", self.exec_id[:12], exc)
                return
            if not info.get("Running") and info.get("ExitCode") is not None:
                self._finish(int(info["ExitCode"]), 0)
                return
            await asyncio.sleep(0.05)  # exec_die normally arrives first; this is the fallback

    async def wait(self) -> tuple[int, int]:
        return await asyncio.shield(self._exit)

    # --- input ------------------------------------------------------------------------
    async def write_stdin(self, data: bytes) -> None:
        try:
            await self._loop.sock_sendall(self._sock, data)
        except OSError:
            pass  # the command closed its stdin; what it did not read is gone, as with ssh

    async def close_stdin(self) -> None:
        if self.tty:
            await self.write_stdin(b"\x04")  # VEOF, what Ctrl+D sends
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)  # the engine closes the command's stdin
        except OSError:
            pass

    def resize(self, width: int, height: int) -> None:
        if not self.tty or width <= 0 or height <= 0:
            return
        self._size = (width, height)
        if self._resizing is None or self._resizing.done():
            self._resizing = self._loop.create_task(self._apply_size())

    async def initial_size(self, width: int, height: int) -> None:
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
                await self._resize(*size)
                applied = size
            except Exception as exc:
                # Right after start the engine may not have the process yet: retry, bounded.
                failures += 1
                if failures >= RESIZE_TRIES or self._exit.done():
                    log.debug("exec %s: resize failed: %s", self.exec_id[:12], exc)
                    return
                await asyncio.sleep(0.02 * 2 ** failures)

    # --- signals ----------------------------------------------------------------------
    async def _learn_pid(self) -> None:
        for _ in range(PID_TRIES):
            try:
                info = await self._inspect()
            except Exception:
                return
            if info.get("Pid"):
                self.pid = int(info["Pid"])
                for signum in self._pending_signals:
                    self.signal(signum)
                self._pending_signals.clear()
                return
            if self._exit.done() or (info.get("ExitCode") is not None
                                     and not info.get("Running")):
                return
            await asyncio.sleep(0.01)

    def signal(self, signum: int) -> None:
        if not self.pid:
            self._pending_signals.append(signum)
            return
        if self._exit.done():
            return
        if self.tty:
            _kill(foreground_group(self.pid), signum, group=True)
        else:
            _kill(self.pid, signum, group=True)  # the exec leads its own session and group

    def _kill_tree(self) -> None:
        if not self.pid:
            return
        _kill(self.pid, signal.SIGKILL, group=True)
        for pid in process_tree(self.pid):
            _kill(pid, signal.SIGKILL, group=False)

    async def terminate(self, grace: float) -> None:
        first = signal.SIGHUP if self.tty else signal.SIGTERM
        if self.pid:
            _kill(self.pid, first, group=True)
            _kill(self.pid, signal.SIGCONT, group=True)
            try:
                await asyncio.wait_for(self.wait(), grace)
            except TimeoutError:
                pass
        await self.kill()

    async def kill(self) -> None:
        if not self.pid and not self._exit.done():
            await self._learn_pid_now()
        self._killed_by = signal.SIGKILL
        self._kill_tree()

    async def _learn_pid_now(self) -> None:
        try:
            self.pid = int((await self._inspect()).get("Pid") or 0)
        except Exception:
            pass

    def close(self) -> None:
        if not self._exit.done():
            self._kill_tree()
        elif self.pid:
            _kill(self.pid, signal.SIGKILL, group=True)  # background children of the command
        for task in self._tasks:
            task.cancel()
        try:
            self._sock.close()
            self._sockio.close()
        except OSError:
            pass
