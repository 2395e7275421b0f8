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
from rune.files.pack import pack_events
from rune.files.reader import ReadError, TreeReader
from rune.files.worker import FileWorker
from rune.files.writer import FileFailed, TreeWriter

Emit = Callable[[str, object], Awaitable[None]]
HOLD_MAX = 256 * 1024  # files up to this size are handed to the writer whole


def _int(value: object) -> int:
    return value if isinstance(value, int) else -1


async def stream_tree(worker: FileWorker, reader: TreeReader, sources: list[str],
                      emit: Emit, pack: bool = False) -> tuple[Manifest, int]:
    """Emits ("header", dict) ("data", bytes) ("end", dict) ("error", dict), and with
    `pack` ("pack", [entry, ...]) for small entries (rune/files/pack.py); returns what
    was sent and how many sources or files could not be read."""
    events = await worker.call(reader.read, sources)
    if pack:
        events = pack_events(events)
    manifest = Manifest()
    failures = 0
    current: Header | None = None
    pending = asyncio.ensure_future(worker.next_batch(events))
    try:
        while True:
            batch = await pending
            if not batch:
                return manifest, failures
            pending = asyncio.ensure_future(worker.next_batch(events))
            for kind, payload in batch:
                if kind == "header":
                    current = payload
                    if payload.kind != "file":
                        manifest.add(payload.path, payload.kind, 0, payload.target)
                    await emit(kind, payload.wire())
                elif kind == "data":
                    await emit(kind, payload)
                elif kind == "pack":
                    for entry in payload:
                        file = entry["kind"] == "file"
                        manifest.add(entry["path"], entry["kind"], entry["size"] if file else 0,
                                     entry["sha256"] if file else entry["target"])
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
        self._held: list[tuple[str, object]] = []

    async def apply(self, kind: str, payload: object) -> None:
        # A small file's header, data and end are written in one hand-off to the worker.
        held = self._held
        if kind == "header" and isinstance(payload, dict) and payload.get("kind") == "file" \
                and 0 <= _int(payload.get("size")) <= HOLD_MAX:
            await self._release()
            self._held = [("header", payload)]
            return
        if kind == "pack":
            await self._release()
            await self.worker.call(self.writer.pack, payload)
            return
        if held and kind in ("data", "end") and len(held) < 64:
            held.append((kind, payload))
            if kind == "end":
                self._held = []
                await self.worker.call(self._apply_all, held)
            return
        await self._release()
        await self.worker.call(self._apply_all, [(kind, payload)])

    async def _release(self) -> None:
        held, self._held = self._held, []
        if held:
            await self.worker.call(self._apply_all, held)

    def _apply_all(self, entries: list[tuple[str, object]]) -> None:
        w = self.writer
        for kind, payload in entries:
            if kind == "header":
                w.header(payload)
            elif kind == "data":
                w.data(payload)
            elif kind == "end":
                w.end(payload)

    def new_errors(self) -> list[FileFailed]:
        fresh = self.writer.errors[self._reported:]
        self._reported = len(self.writer.errors)
        return fresh

    async def finish(self) -> Manifest:
        await self._release()
        return await self.worker.call(self.writer.finish)

    async def abort(self) -> None:
        await self.worker.call(self.writer.close)
