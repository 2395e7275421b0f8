"""The local terminal: when to ask for a remote TTY, raw mode, and the window size."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import sys
import termios
import tty

# The one list of interactive programs, shared with the apiserver (rune/interactive.py).
from rune.interactive import wants_tty


def decide_tty(command: list[str], force: bool | None, stdin_tty: bool | None = None,
               stdout_tty: bool | None = None) -> tuple[bool, str]:
    """--tty/--no-tty win; otherwise an interactive command with stdin and stdout terminals."""
    if force is True:
        return True, "--tty given"
    if force is False:
        return False, "--no-tty given"
    interactive, why = wants_tty(command)
    if not interactive:
        return False, why
    stdin_tty = sys.stdin.isatty() if stdin_tty is None else stdin_tty
    stdout_tty = sys.stdout.isatty() if stdout_tty is None else stdout_tty
    if not (stdin_tty and stdout_tty):
        return False, f"{why}, but stdin or stdout is not a terminal"
    return True, f"{why} and stdin and stdout are terminals"


def window_size(fd: int | None = None, fds: tuple[int, ...] = (1, 0, 2)) -> tuple[int, int]:
    """(columns, rows) of the local terminal, or (0, 0) when there is none."""
    for candidate in ([fd] if fd is not None else fds):
        try:
            rows, cols, _, _ = struct.unpack(
                "HHHH", fcntl.ioctl(candidate, termios.TIOCGWINSZ, b"\0" * 8))
            if rows and cols:
                return cols, rows
        except OSError:
            continue
    return 0, 0


class RawMode:
    """Puts a terminal in raw mode and always gives back exactly the settings it found."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self._saved: list | None = None

    def __enter__(self) -> RawMode:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def restore(self) -> None:
        if self._saved is not None:
            saved, self._saved = self._saved, None
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
            except (termios.error, OSError):
                pass  # the terminal hung up: there is nothing left to give back

    def suspend(self) -> None:
        """Cooked again while the user's shell has the terminal (after Ctrl+Z)."""
        if self._saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def resume(self) -> None:
        if self._saved is not None:
            with contextlib.suppress(termios.error, OSError):
                tty.setraw(self.fd, termios.TCSANOW)

    def __exit__(self, *exc: object) -> None:
        self.restore()
