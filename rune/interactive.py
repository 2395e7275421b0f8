"""Which commands are interactive by nature: one list for the CLI's TTY auto-detect and the
apiserver's choice of verb (an interactive shell without a TTY still needs `exec-tty`)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

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
# A "script" that is the session's own stdin is a program typed in as it runs.
STDIN_SCRIPTS = frozenset({"-", "/dev/stdin", "/dev/fd/0", "/proc/self/fd/0", "/dev/tty"})
_VERSIONED = re.compile(r"^(python|perl|ruby|lua|php)[0-9.]*$")


def base_name(name: str) -> str:
    name = os.path.basename(name)
    match = _VERSIONED.match(name)
    return match.group(1) if match else name


def wants_tty(command: Sequence[str]) -> tuple[bool, str]:
    """Whether COMMAND is interactive by nature, and why (for --verbose)."""
    name, args = base_name(command[0]), list(command[1:])
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
        if script is not None and script not in STDIN_SCRIPTS:
            return False, f"{shown} runs the script {script}"
        return True, f"{shown} is an interactive {kind} (no script given)"
    return False, f"{shown} is not an interactive program"


def is_interactive_shell(command: Sequence[str]) -> bool:
    """A shell, interpreter or database client reading what to run from its input (the
    programs a session would need `exec-tty` for even without a TTY)."""
    if not command:
        return False
    name = base_name(command[0])
    if name not in SHELLS and name not in INTERPRETERS and name not in CLIENTS:
        return False
    return wants_tty(command)[0]
