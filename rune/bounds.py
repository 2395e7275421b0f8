"""The bounds every session request meets, written once for every program that checks one.

The apiserver checks a request at its boundary and the agent checks it again, because an
agent trusts no caller: both go through these functions (and the models built on them in
rune/models.py), so the two can never disagree on what a valid request is.

    name         [A-Za-z0-9_-]{1,128}, matched in full (no trailing newline)
                 namespaces, services, instance ids, agent ids, session ids
    label        key [A-Za-z0-9_./-]{1,128}, value up to 256 printable characters
    terminal     width and height 0-65535 (0 = unknown)
    timeout      finite, > 0 (seconds)
    signal       1-64
    argv         1-32768 elements, each <= 128 KiB, <= 1 MiB in all, no NUL
    env          keys non-empty without "=" or NUL, values without NUL, <= 64 KiB in all
    workdir      empty or absolute, no NUL, <= 4096 bytes
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from rune.errors import InvalidArgument

NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
LABEL_KEY = re.compile(r"[A-Za-z0-9_./-]{1,128}")
MAX_LABEL_VALUE = 256
MAX_TERMINAL = 65535
MAX_SIGNAL = 64
MAX_ARGC = 32768
MAX_ARG_BYTES = 128 * 1024
MAX_ARGV_BYTES = 1024 * 1024
MAX_ENV_BYTES = 64 * 1024
MAX_PATH_BYTES = 4096
MAX_TERM = 64


class OutOfBounds(InvalidArgument, ValueError):
    """A request field is outside its documented bounds; the message names the field.
    A ValueError too, so that pydantic validators report it as the field's error."""


def name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise OutOfBounds(f"{what} {value!r} must match [A-Za-z0-9_-]{{1,128}}")
    return value


def labels(values: Mapping[str, str], what: str = "label") -> dict[str, str]:
    for key, value in values.items():
        if not LABEL_KEY.fullmatch(key):
            raise OutOfBounds(f"{what} key {key!r} must match [A-Za-z0-9_./-]{{1,128}}")
        if len(value) > MAX_LABEL_VALUE or not value.isprintable():
            raise OutOfBounds(f"{what} {key} value must be at most {MAX_LABEL_VALUE} "
                              "printable characters")
    return dict(values)


def terminal_size(value: int, what: str) -> int:
    if not 0 <= value <= MAX_TERMINAL:
        raise OutOfBounds(f"{what} {value} is out of range 0-{MAX_TERMINAL}")
    return value


def timeout(value: float, what: str = "timeout") -> float:
    if not math.isfinite(value) or value <= 0:
        raise OutOfBounds(f"{what} {value!r} must be a finite number of seconds above 0")
    return value


def signal(value: int) -> int:
    if not 1 <= value <= MAX_SIGNAL:
        raise OutOfBounds(f"signal {value} is out of range 1-{MAX_SIGNAL}")
    return value


def argv(values: Sequence[str], max_argc: int = MAX_ARGC,
         max_bytes: int = MAX_ARGV_BYTES) -> list[str]:
    if not values:
        raise OutOfBounds("command is empty")
    if len(values) > min(max_argc, MAX_ARGC):
        raise OutOfBounds(f"command has too many arguments: {len(values)} > "
                          f"{min(max_argc, MAX_ARGC)}")
    total = 0
    for index, arg in enumerate(values):
        size = len(arg.encode("utf-8", "surrogateescape")) + 1
        if size > MAX_ARG_BYTES:
            raise OutOfBounds(f"command argument {index} is too large: {size} bytes > "
                              f"{MAX_ARG_BYTES}")
        if "\0" in arg:
            raise OutOfBounds(f"command argument {index} contains a NUL byte")
        total += size
    cap = min(max_bytes, MAX_ARGV_BYTES)
    if total > cap:
        raise OutOfBounds(f"command is too large: {total} bytes > {cap}")
    return list(values)


def env(values: Mapping[str, str], max_bytes: int = MAX_ENV_BYTES) -> dict[str, str]:
    total = 0
    for key, value in values.items():
        if not key or "=" in key or "\0" in key:
            raise OutOfBounds(f"env name {key!r} must be non-empty, without '=' or NUL")
        if "\0" in value:
            raise OutOfBounds(f"env {key} contains a NUL byte")
        total += len(key.encode()) + len(value.encode()) + 2
    cap = min(max_bytes, MAX_ENV_BYTES)
    if total > cap:
        raise OutOfBounds(f"env is too large: {total} bytes > {cap}")
    return dict(values)


def workdir(value: str) -> str:
    if "\0" in value:
        raise OutOfBounds("workdir contains a NUL byte")
    if value and not value.startswith("/"):
        raise OutOfBounds(f"workdir must be an absolute path, not {value!r}")
    if len(value.encode()) > MAX_PATH_BYTES:
        raise OutOfBounds(f"workdir is longer than {MAX_PATH_BYTES} bytes")
    return value


def term(value: str) -> str:
    if len(value) > MAX_TERM or not all(c.isalnum() or c in "-_.+" for c in value):
        raise OutOfBounds(f"TERM {value!r} must be at most {MAX_TERM} of [A-Za-z0-9._+-]")
    return value
