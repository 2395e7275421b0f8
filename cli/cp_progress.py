"""The progress line of `rune cp` on a terminal: bytes, rate, ETA (rich, on stderr)."""

from __future__ import annotations

import sys
from typing import Any


class CopyProgress:
    """A no-op unless enabled; rich is imported only when it is."""

    def __init__(self, enabled: bool, label: str) -> None:
        self._bar: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn(),
                             console=Console(file=sys.stderr), transient=True)
        self._task = self._bar.add_task(label, total=None)
        self._total = 0
        self._bar.start()

    def expect(self, size: int) -> None:
        if self._bar is not None and size > 0:
            self._total += size
            self._bar.update(self._task, total=self._total)

    def advance(self, size: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, size)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def wanted(flag: bool | None) -> bool:
    """--progress / --no-progress, else on when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag
