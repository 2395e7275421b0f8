"""Parsing what the user typed: durations, --env pairs, and where COMMAND starts."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'5m', '30s', '1.5h', '250ms' or plain seconds → seconds; raises ValueError."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"invalid duration {text!r} (examples: 30s, 5m, 1h)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


def parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid --env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def mark_command_start(args: list[str], valued_options: set[str]) -> list[str]:
    """Inserts '--' before COMMAND so that everything from COMMAND on is passed verbatim.

    `args` are the words after `exec`. Options before COMMAND belong to rune; the
    first word that is not an option (or an option's value) is TARGET, the next
    one is COMMAND.
    """
    positionals = 0
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            return args
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            if "=" not in word and name in valued_options:
                i += 1
            i += 1
            continue
        positionals += 1
        if positionals == 2:
            return [*args[:i], "--", *args[i:]]
        i += 1
    return args
