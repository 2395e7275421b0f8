"""One thread for a copy's blocking file I/O, so the event loop never waits on a disk.

A copy's calls run in order on the same thread: that thread may carry a file-system
identity of its own (the agent sets the instance user's fsuid/fsgid on it), and a
reader's generator is always advanced where it started.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


class FileWorker:
    def __init__(self, setup: Callable[[], None] | None = None) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rune-files",
                                        initializer=setup)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def next(self, events: Iterator[T]) -> T | None:
        """The generator's next item, produced on the worker thread; None at its end."""
        item = await self.call(next, events, _DONE)
        return None if item is _DONE else item

    async def next_batch(self, events: Iterator[T], max_items: int = 256,
                         max_bytes: int = 1024 * 1024) -> list[T]:
        """The generator's next items, up to a count or a size of data: one thread
        hand-off for many small entries. Empty at its end."""
        return await self.call(_take, events, max_items, max_bytes)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _take(events: Iterator, max_items: int, max_bytes: int) -> list:
    items, size = [], 0
    for item in events:
        items.append(item)
        if item[0] == "data":
            size += len(item[1])
        elif item[0] == "pack":
            size += sum(len(e.get("data") or b"") for e in item[1])
        if len(items) >= max_items or size >= max_bytes:
            break
    return items
