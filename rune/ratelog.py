"""A logger wrapper that drops repeats, so garbage on the bus cannot flood the logs."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, per_seconds: float = 5.0) -> None:
        self._logger = logger
        self._per = per_seconds
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self._per:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        suffix = f" ({skipped} similar suppressed)" if skipped else ""
        self._logger.warning(msg + suffix, *args)
