"""One event loop for all of the bench's in-process async work, open until the bench exits.

gRPC's aio poller binds every event loop that ever made a call, and hands each call's
completions to that call's own loop. With one asyncio.run() per measurement, a call still
ending when its loop closed turned into "Event loop is closed" tracebacks on the next loop;
one loop that stays open has nothing closed to hand them to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_loop: asyncio.AbstractEventLoop | None = None


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Runs CORO to completion on the bench's loop (created on first use)."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coro)
