"""Tools for fault tests: a CLI session watched from outside, bounded waits, bus access."""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rune.cli.devstack import Stack

BLOCK = 64 * 1024


def wait_for(check: Callable[[], object], timeout: float, what: str,
             step: float = 0.05) -> float:
    """Polls `check` until truthy (bounded in time); returns the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(step)


def pids_with(marker: str) -> list[int]:
    """Pids of processes whose command line holds `marker` (the host-side orphan check)."""
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def rss_kib(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def block(i: int) -> bytes:
    """Block i of the deterministic stream the remote generator writes."""
    return hashlib.sha256(str(i).encode()).digest() * (BLOCK // 32)


def generator_script(blocks: int, pause: float = 0.0, progress: str = "") -> str:
    """Python source that writes `blocks` blocks to stdout, optionally pacing and counting."""
    return (
        "import hashlib, sys, time\n"
        f"for i in range({blocks}):\n"
        f"    sys.stdout.buffer.write(hashlib.sha256(str(i).encode()).digest() * {BLOCK // 32})\n"
        "    sys.stdout.buffer.flush()\n"
        + (f"    open({progress!r}, 'w').write(str(i + 1))\n" if progress else "")
        + (f"    time.sleep({pause})\n" if pause else "")
    )


def expected_sha(blocks: int) -> str:
    digest = hashlib.sha256()
    for i in range(blocks):
        digest.update(block(i))
    return digest.hexdigest()


class Session:
    """A `rune exec -v` child whose stdout is hashed and stderr collected as they come."""

    def __init__(self, rune: object, *args: str, read: bool = True) -> None:
        self.proc = rune.popen("exec", "-v", *args, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.digest = hashlib.sha256()
        self.received = 0
        self.head = b""
        self.last_data = time.monotonic()
        self.stderr_lines: queue.Queue[str] = queue.Queue()
        self.stderr_text = ""
        self.ended: float | None = None
        self._reading = threading.Event()
        if read:
            self._reading.set()
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def start_reading(self) -> None:
        self._reading.set()

    def _read_out(self) -> None:
        self._reading.wait()
        while True:
            chunk = self.proc.stdout.read1(BLOCK) if hasattr(self.proc.stdout, "read1") \
                else self.proc.stdout.read(BLOCK)
            if not chunk:
                self.ended = time.monotonic()
                return
            if len(self.head) < 4096:
                self.head += chunk[:4096]
            self.digest.update(chunk)
            self.received += len(chunk)
            self.last_data = time.monotonic()

    def _read_err(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.stderr_text += line
            self.stderr_lines.put(line)

    def session_id(self, timeout: float = 20.0) -> str:
        """The id the CLI reports once the session started (from its -v line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.stderr_lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            found = re.search(r"session ([0-9a-f]+) on instance", line)
            if found:
                return found.group(1)
        raise AssertionError(f"no session started; stderr so far: {self.stderr_text!r}")

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        wait_for(lambda: self.ended is not None, 10, "CLI stdout closed")
        return code

    def errors(self) -> list[str]:
        return [line for line in self.stderr_text.splitlines() if line.startswith("Error:")]


def kill9(stack: Stack, name: str) -> float:
    """SIGKILLs one part of the stack; returns the instant it was killed."""
    proc = stack.procs[name]
    os.kill(proc.pid, signal.SIGKILL)
    at = time.monotonic()
    proc.wait(timeout=10)
    return at


def publish(nats_url: str, messages: list[tuple[str, bytes]]) -> None:
    """Publishes raw messages with a plain NATS client of its own."""
    import nats

    async def go() -> None:
        nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=0)
        try:
            for subject, data in messages:
                await nc.publish(subject, data)
            await nc.flush(timeout=10)
        finally:
            await nc.close()

    asyncio.run(go())


def count_lines(path: Path, pattern: str) -> int:
    text = path.read_text(errors="replace") if path.exists() else ""
    return sum(1 for line in text.splitlines() if pattern in line)
