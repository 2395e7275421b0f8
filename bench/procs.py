"""Timing whole processes: one command to completion, or draining and counting its stdout."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench.context import ROOT

READ = 1 << 20


class CommandFailed(RuntimeError):
    pass


def timed_run(argv: list[str], env: dict | None = None, timeout: float = 60.0) -> float:
    """Seconds from spawn to exit of ARGV (stdin /dev/null); raises unless it exits 0."""
    began = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, cwd=ROOT, env=env, timeout=timeout)
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise CommandFailed(f"{' '.join(argv[:6])}… exited {done.returncode}: "
                            f"{done.stderr.decode(errors='replace').strip()[-300:]}")
    return elapsed


def timed_runs(argv: list[str], n: int, warmup: int, env: dict | None = None) -> list[float]:
    for _ in range(warmup):
        timed_run(argv, env)
    return [timed_run(argv, env) for _ in range(n)]


def drain(argv: list[str], expected: int, env: dict | None = None, timeout: float = 600.0,
          log: Path | None = None) -> float:
    """Seconds to run ARGV with its stdout read and counted by us; checks every byte came."""
    err = open(log, "ab") if log else subprocess.DEVNULL
    began = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=err, cwd=ROOT, env=env, start_new_session=True)
    if log:
        err.close()
    count = _read_all(proc.stdout.fileno(), began + timeout, proc)
    proc.stdout.close()
    code = proc.wait(timeout=max(1.0, began + timeout - time.perf_counter()))
    elapsed = time.perf_counter() - began
    if code != 0 or count != expected:
        raise CommandFailed(f"{' '.join(argv[:8])}… exited {code} after {count} of "
                            f"{expected} bytes")
    return elapsed


def _read_all(fd: int, deadline: float, proc: subprocess.Popen | None) -> int:
    buffer = bytearray(READ)
    count = 0
    with open(fd, "rb", buffering=0, closefd=False) as stream:
        while True:
            got = _readinto(stream, buffer)
            if not got:
                return count
            count += got
            if time.perf_counter() > deadline:
                if proc is not None:
                    proc.kill()
                raise CommandFailed(f"timed out after {count} bytes")


def _readinto(stream: object, buffer: bytearray) -> int:
    try:
        return stream.readinto(buffer) or 0
    except OSError:  # EIO: the PTY's other side closed
        return 0


def drain_local_pty(argv: list[str], expected: int, timeout: float = 600.0) -> float:
    """Like drain(), with ARGV's stdio on a fresh local PTY (the floor for TTY output)."""
    master, slave = os.openpty()
    began = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    try:
        count = _read_all(master, began + timeout, proc)
    finally:
        os.close(master)
    code = proc.wait(timeout=30)
    elapsed = time.perf_counter() - began
    if code != 0 or count != expected:
        raise CommandFailed(f"local PTY: exited {code} after {count} of {expected} bytes")
    return elapsed
