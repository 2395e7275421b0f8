"""Server-sent events over one aiohttp response: named events, ids, keep-alive comments."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from rune.errors import RuneError


class EventStream:
    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})

    async def open(self) -> None:
        await self.response.prepare(self.request)
        # Ask the browser to wait a moment before reconnecting; ":" lines are comments.
        await self.response.write(b"retry: 1000\n: open\n\n")

    async def send(self, event: str, data: dict[str, Any], event_id: str | None = None) -> None:
        text = json.dumps(data, separators=(",", ":"))  # one line: JSON escapes newlines
        head = f"id: {event_id}\n" if event_id is not None else ""
        await self.response.write(f"{head}event: {event}\ndata: {text}\n\n".encode())

    async def comment(self, text: str) -> None:
        await self.response.write(f": {text}\n\n".encode())

    async def fail(self, exc: RuneError) -> None:
        """Tells the page why the stream ends (permission denied, not found, ...)."""
        if self.response.prepared:
            try:
                await self.send("failure", {"error": exc.message, "code": exc.code})
            except ConnectionResetError:
                pass
