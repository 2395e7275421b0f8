"""The local terminal: when to ask for a remote TTY, raw mode, and the window size."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
import sys
import termios
import tty

# Full-screen or line-editing programs: interactive whatever their arguments.
SCREEN_PROGRAMS = frozenset({
    "vim", "vi", "nvim", "nano", "emacs", "top", "htop", "less", "more", "watch",
})
# Shells and interpreters: interactive when started without a script or a -c/-e command.
SHELLS = frozenset({"bash", "sh", "zsh", "fish", "tcsh", "csh", "dash", "ash", "ksh"})
INTERPRETERS = frozenset({"python", "python2", "python3", "ipython", "node", "irb", "ruby",
                          "lua", "perl", "php", "R", "ghci", "erl", "iex"})
# Database clients take options with values; only a command flag makes them non-interactive.
CLIENTS = frozenset({"psql", "mysql", "mariadb", "redis-cli", "sqlite3", "mongosh"})
COMMAND_FLAGS = frozenset({"-c", "-e", "-m", "--command", "--eval", "--execute", "-E"})
_VERSIONED = re.compile(r"^(python|perl|ruby|lua|php)[0-9.]*$")


def _base(name: str) -> str:
    name = os.path.basename(name)
    match = _VERSIONED.match(name)
    return match.group(1) if match else name


def wants_tty(command: list[str]) -> tuple[bool, str]:
    """Whether COMMAND is interactive by nature, and why (for --verbose)."""
    name, args = _base(command[0]), command[1:]
    shown = os.path.basename(command[0])
    if name in SCREEN_PROGRAMS:
        return True, f"{shown} is an interactive program"
    flagged = next((a for a in args if a in COMMAND_FLAGS), None)
    if name in CLIENTS:
        if flagged:
            return False, f"{shown} {flagged} runs one command"
        return True, f"{shown} is an interactive client"
    if name in SHELLS or name in INTERPRETERS:
        kind = "shell" if name in SHELLS else "interpreter"
        if "-i" in args:
            return True, f"{shown} -i is interactive"
        if flagged:
            return False, f"{shown} {flagged} runs one command"
        script = next((a for a in args if not a.startswith("-")), None)
        if script is not None:
            return False, f"{shown} runs the script {script}"
        return True, f"{shown} is an interactive {kind} (no script given)"
    return False, f"{shown} is not an interactive program"


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
