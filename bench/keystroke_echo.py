"""Keystroke echo round trip through a TTY: `rune exec -t api cat` vs `ssh -tt` vs a local PTY.

Types one byte at a time into the terminal the program runs in and times until the
echo of that byte comes back; p50 and p99 (in ms) over N keystrokes.

    python bench/keystroke_echo.py [--keys 500]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import select
import shlex
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/keystroke_echo.py`: the repo root holds bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ptyprocess import PtyProcess  # noqa: E402

from bench import rows  # noqa: E402  (sets GRPC_ENABLE_FORK_SUPPORT before gRPC loads)
from bench.context import ROOT, BenchContext, Sizes  # noqa: E402

SECTION = "3. keystroke echo through a TTY (`cat`)"
LINE = 64  # keystrokes per line; Enter (not timed) keeps the canonical line buffer short
# The same program everywhere: no ^X echo quirks, a marker once the terminal is set up.
ECHO = ["sh", "-c", "stty -echoctl; printf ready; exec cat"]
RUNE, SSH, LOCAL = "echo.rune", "echo.ssh", "echo.local"


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


def echo_times(argv: list[str], keys: int, warmup: int, env: dict | None = None) -> list[float]:
    """ARGV (which ends up running ECHO) on a fresh local PTY: KEYS timed keystrokes."""
    proc = PtyProcess.spawn(argv, cwd=str(ROOT), env=env, dimensions=(24, 80))
    try:
        read_until(proc.fd, b"ready", timeout=30)
        return measure(proc, warmup + keys)[warmup:]
    finally:
        proc.terminate(force=True)


def run(ctx: BenchContext) -> list[dict]:
    n, warmup = ctx.sizes.echo_n, ctx.sizes.warmup
    rune_name = f"`rune exec -t {ctx.target} cat`"
    out = [_guard(RUNE, rune_name, lambda: rows.latency(
        RUNE, SECTION, rune_name, echo_times(ctx.rune_argv("-t", ctx.target, *ECHO), n, warmup,
                                             ctx.env)))]
    if ctx.sshd:
        # ssh joins its arguments into one remote shell line: quote the command as one.
        out.append(_guard(SSH, "`ssh -tt localhost cat`", lambda: rows.latency(
            SSH, SECTION, "`ssh -tt localhost cat`",
            echo_times(ctx.sshd.argv(shlex.join(ECHO), tty=True), n, warmup), ref=RUNE)))
    else:
        out.append(rows.absent(SSH, SECTION, "`ssh -tt localhost cat`", rows.SKIPPED,
                               ctx.sshd_reason))
    out.append(_guard(LOCAL, "`cat` on a local PTY (the floor)", lambda: rows.latency(
        LOCAL, SECTION, "`cat` on a local PTY (the floor)", echo_times(ECHO, n, warmup),
        ref=RUNE) | {"floor": True}))
    return out



def _guard(row_id: str, name: str, measure: object) -> dict:
    return rows.guarded(row_id, SECTION, name, measure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=500)
    args = parser.parse_args()
    from bench.harness import standalone

    standalone(run, dataclasses.replace(Sizes(), echo_n=args.keys))


if __name__ == "__main__":
    main()
