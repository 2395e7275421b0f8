"""Keystroke echo round trip: `rune exec -t api cat` beside `cat` under a local PTY.

Types one byte at a time into the terminal the program runs in and times until the
echo of that byte comes back; prints p50 and p99 (in ms) over N keystrokes.

    python bench/keystroke_echo.py [--keys 500]
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ptyprocess import PtyProcess

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# This process uses gRPC and then forks a PTY child: keep gRPC's fork handlers out of it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from cli.devstack import Stack, free_port  # noqa: E402

SERVICES = [{"name": "api", "namespace": "default", "replicas": 1,
             "command": ["sh", "-c", "exec sleep 2147483647"]}]
LINE = 64  # keystrokes per line; Enter (not timed) keeps the canonical line buffer short


def read_until(fd: int, needle: bytes, timeout: float = 10.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {needle!r} after {timeout}s; got {seen[-200:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # EIO: the program in the terminal is gone
                raise RuntimeError(f"the program ended; it printed {seen[-500:]!r}") from None
    return seen


def measure(proc: PtyProcess, keys: int) -> list[float]:
    """Round trips in seconds: write one letter, wait for its echo."""
    fd = proc.fd
    samples = []
    typed = 0
    while typed < keys:
        line = b""
        for i in range(min(LINE, keys - typed)):
            key = bytes([ord("a") + i % 26])
            began = time.perf_counter()
            os.write(fd, key)
            read_until(fd, key)
            samples.append(time.perf_counter() - began)
            line += key
            typed += 1
        os.write(fd, b"\r")
        read_until(fd, b"\r\n" + line + b"\r\n")  # the echo of Enter, then cat's line
    return samples


def report(name: str, samples: list[float]) -> None:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * len(ms))) - 1)]
    print(f"{name:<28} n={len(ms)}  p50 {statistics.median(ms):7.3f} ms  p99 {p99:7.3f} ms")


def bench_local(keys: int) -> list[float]:
    proc = PtyProcess.spawn(["cat"], dimensions=(24, 80))
    try:
        return measure(proc, keys)
    finally:
        proc.terminate(force=True)


def bench_rune(keys: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(tmp, nats_port=free_port(), api_port=free_port())
        try:
            stack.start_nats()
            stack.start_apiserver()
            stack.start_agent("a1", SERVICES)
            env = {**os.environ, "RUNE_CONFIG": str(Path(tmp) / "none.yaml")}
            proc = PtyProcess.spawn(
                [sys.executable, "-m", "cli.main", "exec", "--api-server", stack.api_address,
                 "-t", "api", "sh", "-c", "stty -echoctl; printf ready; exec cat"],
                cwd=str(ROOT), env=env, dimensions=(24, 80))
            try:
                read_until(proc.fd, b"ready", timeout=30)
                return measure(proc, keys)
            finally:
                proc.terminate(force=True)
        finally:
            stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=500)
    args = parser.parse_args()
    report("local PTY (cat)", bench_local(args.keys))
    report("rune exec -t api cat", bench_rune(args.keys))


if __name__ == "__main__":
    main()
