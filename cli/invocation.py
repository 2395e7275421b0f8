"""One run of a `rune` command: its words, where it runs, and the descriptors it owns.

The same command code runs in the `rune` process itself or inside the multiplexer on
descriptors a client passed over; it reaches stdio, the environment, the working
directory and signals only through an Invocation, never through `sys` or `os.environ`.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, BinaryIO, TextIO

if TYPE_CHECKING:
    from rune.cli.client import ChannelPool
    from rune.cli.settings import UserConfig


class LoopSignals:
    """Signals this process receives, handled on its event loop (the in-process run).

    SIGTSTP and SIGCONT are left to the kernel: the whole process stops and resumes.
    """

    UNHANDLED = (signal.SIGTSTP, signal.SIGCONT)

    def add(self, signum: int, callback: Callable[[], None]) -> None:
        if signum not in self.UNHANDLED:
            asyncio.get_running_loop().add_signal_handler(signum, callback)

    def remove(self, signum: int) -> None:
        if signum not in self.UNHANDLED:
            asyncio.get_running_loop().remove_signal_handler(signum)


class RelayedSignals:
    """Signals a multiplexer client received and relayed: delivered to the handlers here."""

    def __init__(self) -> None:
        self._handlers: dict[int, Callable[[], None]] = {}

    def add(self, signum: int, callback: Callable[[], None]) -> None:
        self._handlers[signum] = callback

    def remove(self, signum: int) -> None:
        self._handlers.pop(signum, None)

    def deliver(self, signum: int) -> bool:
        handler = self._handlers.get(signum)
        if handler is not None:
            handler()
        return handler is not None


@dataclass
class Invocation:
    argv: list[str]
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    cwd: str = field(default_factory=os.getcwd)
    stdin: int = 0
    stdout: int = 1
    stderr: int = 2
    signals: LoopSignals | RelayedSignals = field(default_factory=LoopSignals)
    channels: ChannelPool | None = None  # the multiplexer's warm channels; None: fresh ones
    in_mux: bool = False

    @cached_property
    def out(self) -> TextIO:
        return open(self.stdout, "w", buffering=1, encoding="utf-8", errors="replace",
                    closefd=False)

    @cached_property
    def err(self) -> TextIO:
        return open(self.stderr, "w", buffering=1, encoding="utf-8", errors="replace",
                    closefd=False)

    @cached_property
    def out_bytes(self) -> BinaryIO:
        return open(self.stdout, "wb", closefd=False)

    @cached_property
    def err_bytes(self) -> BinaryIO:
        return open(self.stderr, "wb", closefd=False)

    @cached_property
    def config(self) -> UserConfig:
        """The user's config file, read once per command (a broken one is an OSError)."""
        from rune.cli.settings import load_user_config

        return load_user_config(self.env, self.cwd)

    def path(self, name: str) -> str:
        """A path the user gave, as they meant it: `~` is their home, relative is their cwd."""
        if name.startswith("~"):
            home = self.env.get("HOME") or os.path.expanduser("~")
            name = home + name[1:] if name == "~" or name.startswith("~/") else name
        return os.path.join(self.cwd, name)

    def isatty(self, fd: int) -> bool:
        return os.isatty(fd)

    def flush(self) -> None:
        for name in ("out", "err", "out_bytes", "err_bytes"):
            stream = self.__dict__.get(name)
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        """Flushes and drops the stream objects (the descriptors stay open: not theirs)."""
        self.flush()
        for name in ("out", "err", "out_bytes", "err_bytes"):
            stream = self.__dict__.pop(name, None)
            if stream is not None:
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
