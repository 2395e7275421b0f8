"""A tree between a file system and a transport, with the file work on a FileWorker.

`stream_tree` reads sources and hands each entry to `emit` (reading the next chunk on
the worker while the last one is being sent); `TreeSink` applies a peer's entries to a
TreeWriter. Both are transport-agnostic: the agent emits NATS frames, the CLI gRPC
messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from rune.files.entries import Header, Manifest
from rune.files.reader import ReadError, TreeReader
from rune.files.worker import FileWorker
from rune.files.writer import FileFailed, TreeWriter

Emit = Callable[[str, object], Awaitable[None]]


async def stream_tree(worker: FileWorker, reader: TreeReader, sources: list[str],
                      emit: Emit) -> tuple[Manifest, int]:
    """Emits ("header", dict) ("data", bytes) ("end", dict) ("error", dict); returns
    what was sent and how many sources or files could not be read."""
    events = await worker.call(reader.read, sources)
    manifest = Manifest()
    failures = 0
    current: Header | None = None
    pending = asyncio.ensure_future(worker.next(events))
    try:
        while True:
            item = await pending
            if item is None:
                return manifest, failures
            pending = asyncio.ensure_future(worker.next(events))
            kind, payload = item
            if kind == "header":
                current = payload
                if payload.kind != "file":
                    manifest.add(payload.path, payload.kind, 0, payload.target)
                await emit(kind, payload.wire())
            elif kind == "data":
                await emit(kind, payload)
            elif kind == "end":
                if current is not None and payload.get("size", -1) >= 0:
                    manifest.add(current.path, "file", payload["size"], payload["sha256"])
                current = None
                await emit(kind, payload)
            elif isinstance(payload, ReadError):
                failures += 1
                await emit("error", {"path": payload.path, "message": payload.message})
    finally:
        pending.cancel()
        await worker.call(events.close)


class TreeSink:
    """A TreeWriter fed from the event loop; errors are collected for reporting."""

    def __init__(self, worker: FileWorker, writer: TreeWriter) -> None:
        self.worker = worker
        self.writer = writer
        self._reported = 0

    async def apply(self, kind: str, payload: object) -> None:
        if kind == "header":
            await self.worker.call(self.writer.header, payload)
        elif kind == "data":
            await self.worker.call(self.writer.data, payload)
        elif kind == "end":
            await self.worker.call(self.writer.end, payload)

    def new_errors(self) -> list[FileFailed]:
        fresh = self.writer.errors[self._reported:]
        self._reported = len(self.writer.errors)
        return fresh

    async def finish(self) -> Manifest:
        return await self.worker.call(self.writer.finish)

    async def abort(self) -> None:
        await self.worker.call(self.writer.close)
