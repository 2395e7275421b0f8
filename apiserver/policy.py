"""Command policy: allowed and blocked command patterns matched on the parsed argv.

A pattern is a command line split like a shell would (`rm -rf`, `git push`):
- its first word matches argv[0] by basename (`/bin/rm` is `rm`);
- its short-flag words must all be present in argv, combined or not
  (`-rf` matches `-rf`, `-fr` and `-r -f`); long flags (`--force`) must be present
  (also as `--force=…`);
- its other words must be the first positional words of argv, in order.

Blocklists also look through wrappers that only run the rest of argv (`env`,
`nice`, `sudo` …). They cannot see inside a shell or an interpreter: an allowed
`sh -c '…'` defeats any blocklist, so the allowlist is the boundary.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

# Commands that run their remaining arguments as a command line (their own options skipped).
WRAPPERS = frozenset(("env", "nice", "nohup", "sudo", "doas", "command", "exec", "setsid",
                      "stdbuf", "ionice", "time", "timeout", "busybox", "chrt", "taskset"))


@dataclass(frozen=True)
class Pattern:
    text: str
    command: str
    short_flags: frozenset[str]
    long_flags: tuple[str, ...]
    words: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Pattern:
        parts = shlex.split(text)
        if not parts:
            raise ValueError("empty command pattern")
        short: set[str] = set()
        longs: list[str] = []
        words: list[str] = []
        for part in parts[1:]:
            if part.startswith("--") and len(part) > 2:
                longs.append(part)
            elif part.startswith("-") and len(part) > 1:
                short.update(part[1:])
            else:
                words.append(part)
        return cls(text, os.path.basename(parts[0]), frozenset(short), tuple(longs),
                   tuple(words))

    def matches(self, argv: Sequence[str]) -> bool:
        if not argv or os.path.basename(argv[0]) != self.command:
            return False
        short, longs, words = _split_args(argv[1:])
        if not self.short_flags <= short:
            return False
        if any(not any(a == f or a.startswith(f + "=") for a in longs) for f in self.long_flags):
            return False
        return tuple(words[:len(self.words)]) == self.words


def _split_args(args: Sequence[str]) -> tuple[set[str], list[str], list[str]]:
    short: set[str] = set()
    longs: list[str] = []
    words: list[str] = []
    options_done = False
    for arg in args:
        if options_done:
            words.append(arg)
        elif arg == "--":
            options_done = True
        elif arg.startswith("--"):
            longs.append(arg)
        elif arg.startswith("-") and len(arg) > 1:
            short.update(arg[1:])
        else:
            words.append(arg)
    return short, longs, words


def unwrapped(argv: Sequence[str]) -> list[list[str]]:
    """argv, and when argv[0] is a wrapper every tail of it (`sudo -u x env Y=1 rm …`).

    Wrappers take options with values we do not model, so each tail is a candidate:
    a blocklist errs on the side of refusing.
    """
    if not argv or os.path.basename(argv[0]) not in WRAPPERS:
        return [list(argv)]
    return [list(argv[i:]) for i in range(len(argv))]


@dataclass(frozen=True)
class CommandPolicy:
    """One layer of policy (global, a namespace or a role)."""

    allowed: tuple[Pattern, ...] = ()
    blocked: tuple[Pattern, ...] = ()

    @classmethod
    def build(cls, allowed: Sequence[str] | None, blocked: Sequence[str] | None
              ) -> CommandPolicy:
        return cls(tuple(Pattern.parse(p) for p in allowed or ()),
                   tuple(Pattern.parse(p) for p in blocked or ()))

    @property
    def empty(self) -> bool:
        return not self.allowed and not self.blocked

    def refusal(self, argv: Sequence[str]) -> str | None:
        """Why argv is refused by this layer, or None when it may run."""
        for candidate in unwrapped(argv):
            for pattern in self.blocked:
                if pattern.matches(candidate):
                    return f'command matches blocked pattern "{pattern.text}"'
        if self.allowed and not any(p.matches(argv) for p in self.allowed):
            return "command is not in the allowed commands"
        return None
