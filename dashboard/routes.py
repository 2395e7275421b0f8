"""The dashboard's JSON and event-stream endpoints, each one call (or stream) to the apiserver."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web
from rune.dashboard.api import Api
from rune.dashboard.sse import EventStream

from rune.errors import InvalidArgument, RuneError
from rune.proto import exec_pb2 as pb
from rune.subjects import check_token

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KEEPALIVE = 10.0  # seconds of silence before an observer stream writes a comment
SNAPSHOT_EVERY = 2.0  # seconds between full refreshes of the live table (durations, idle, bytes)
MAX_STREAMS = 200  # open event streams at once, so memory stays bounded
EXPORT_PAGE = 500
STATUS = {"invalid_argument": 400, "unauthenticated": 401, "permission_denied": 403,
          "not_found": 404, "resource_exhausted": 429}
LIVE_EVENTS = {"session.started", "session.ended", "session.failed", "session.killed",
               "session.observed"}


def http_status(exc: RuneError) -> int:
    return STATUS.get(exc.code, 502)


def session_row(s: pb.SessionInfo) -> dict[str, Any]:
    return {"session_id": s.session_id, "user": s.user, "namespace": s.namespace,
            "instance": s.instance_id, "host": s.host, "argv": list(s.command), "tty": s.tty,
            "started": s.started, "duration": s.duration, "idle": s.idle,
            "bytes_in": s.bytes_in, "bytes_out": s.bytes_out, "fanout_id": s.fanout_id,
            "recorded": s.recorded, "state": s.state, "exit_code": s.exit_code,
            "signal": s.signal, "exited": s.exited}


def _session_id(request: web.Request) -> str:
    try:
        return check_token(request.match_info["sid"], "session id")
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _when(text: str, what: str) -> float:
    """Unix seconds from a number or an ISO date-time (the browser's local time is sent as
    a number, so no time zone guessing happens here)."""
    if not text:
        return 0.0
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise InvalidArgument(f"bad {what}: {text!r}") from None


def search_request(query: Any) -> pb.AuditSearchRequest:
    """The filter of the audit page (query string) as the apiserver's request."""
    request = pb.AuditSearchRequest(
        namespace=query.get("namespace", "").strip(), user=query.get("user", "").strip(),
        instance=query.get("instance", "").strip(), event=query.get("event", "").strip(),
        denied_only=query.get("denied_only", "") in ("1", "true", "on"),
        since=_when(query.get("since", ""), "since"), until=_when(query.get("until", ""), "until"),
        cursor=query.get("cursor", ""))
    code = query.get("exit_code", "").strip()
    if code:
        try:
            request.exit_code, request.has_exit_code = int(code), True
        except ValueError:
            raise InvalidArgument(f"bad exit code: {code!r}") from None
    limit = query.get("limit", "")
    request.limit = min(int(limit), 1000) if limit.isdigit() and len(limit) < 6 else 100
    return request


class Routes:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.streams = 0

    def _open_stream(self) -> None:
        if self.streams >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(text="too many open event streams")
        self.streams += 1

    async def live(self, request: web.Request) -> web.StreamResponse:
        """SSE: a snapshot of the live sessions, then each audit event as it is stored (its
        stream sequence is the SSE id, so a reconnect resumes after Last-Event-ID), and a
        fresh snapshot every few seconds for durations, idle times and byte counts."""
        token = request["signin"].token
        last = request.headers.get("Last-Event-ID", "")
        cursor = str(int(last) + 1) if last.isdigit() and len(last) < 20 else ""
        self._open_stream()
        stream = EventStream(request)
        try:
            await stream.open()
            queue: asyncio.Queue[pb.AuditEvent | None] = asyncio.Queue(maxsize=1000)
            follower = asyncio.create_task(self._follow(token, cursor, queue))
            try:
                next_snapshot = 0.0
                while True:
                    now = time.monotonic()
                    if now >= next_snapshot:
                        rows = [session_row(s) for s in await self.api.live_sessions(token)]
                        await stream.send("snapshot", {"sessions": rows, "time": time.time()})
                        next_snapshot = now + SNAPSHOT_EVERY
                    try:
                        item = await asyncio.wait_for(queue.get(), next_snapshot - now)
                    except TimeoutError:
                        continue
                    if item is None:
                        follower.result()
                        return stream.response
                    event = json.loads(item.json)
                    if event.get("event") in LIVE_EVENTS:
                        await stream.send("audit", event, event_id=str(item.seq))
            finally:
                follower.cancel()
        except RuneError as exc:
            await stream.fail(exc)
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            self.streams -= 1
        return stream.response

    async def _follow(self, token: str, cursor: str,
                      queue: asyncio.Queue[pb.AuditEvent | None]) -> None:
        try:
            async for event in self.api.follow(token, cursor):
                await queue.put(event)
        finally:
            await queue.put(None)

    async def observe(self, request: web.Request) -> web.StreamResponse:
        """SSE: a live session's output (base64), read-only; `end` when it is over."""
        token = request["signin"].token
        session_id = _session_id(request)
        self._open_stream()
        stream = EventStream(request)
        chunks = self.api.observe(token, session_id)
        pending: asyncio.Future | None = None
        try:
            await stream.open()
            while True:
                # The same read stays pending across keep-alives (cancelling it would end
                # the gRPC stream); writing is how a closed browser tab is noticed.
                pending = pending or asyncio.ensure_future(anext(chunks))
                done, _ = await asyncio.wait((pending,), timeout=KEEPALIVE)
                if not done:
                    await stream.comment("keep-alive")
                    continue
                pending = None
                try:
                    chunk = done.pop().result()
                except StopAsyncIteration:
                    break
                if chunk.width and chunk.height:
                    await stream.send("size", {"width": chunk.width, "height": chunk.height})
                if chunk.data:
                    await stream.send("output", {"data": base64.b64encode(chunk.data).decode(),
                                                 "dropped": chunk.dropped})
                if chunk.ended:
                    await stream.send("end", {"reason": chunk.reason})
                    break
        except RuneError as exc:
            await stream.fail(exc)
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.wait((pending,))
            await chunks.aclose()
            self.streams -= 1
        return stream.response

    async def kill(self, request: web.Request) -> web.Response:
        session_id = _session_id(request)
        try:
            body = await request.json()
        except ValueError:
            raise InvalidArgument("the body must be JSON: {\"reason\": \"...\"}") from None
        reason = str(body.get("reason", "")).strip() if isinstance(body, dict) else ""
        if not reason:
            raise InvalidArgument("a reason is required to end someone's session")
        await self.api.kill(request["signin"].token, session_id, reason)
        return web.json_response({"killed": session_id})

    async def search(self, request: web.Request) -> web.Response:
        reply = await self.api.search(request["signin"].token, search_request(request.query))
        return web.json_response({"events": [_event(e) for e in reply.events],
                                  "next_cursor": reply.next_cursor, "scanned": reply.scanned})

    async def export(self, request: web.Request) -> web.StreamResponse:
        """The current filter as JSONL, page after page: never the whole result in memory."""
        token = request["signin"].token
        search = search_request(request.query)
        search.limit = EXPORT_PAGE
        first = await self.api.search(token, search)  # errors become a status, before streaming
        response = web.StreamResponse(headers={
            "Content-Type": "application/x-ndjson",
            "Content-Disposition": 'attachment; filename="rune-audit.jsonl"'})
        await response.prepare(request)
        reply = first
        try:
            while True:
                if reply.events:
                    await response.write("".join(e.json + "\n" for e in reply.events).encode())
                if not reply.next_cursor:
                    break
                search.cursor = reply.next_cursor
                reply = await self.api.search(token, search)
        except RuneError as exc:
            return _cut_short(request, response, exc)
        await response.write_eof()
        return response

    async def recordings(self, request: web.Request) -> web.Response:
        found = await self.api.recorded_sessions(request["signin"].token)
        found.sort(key=lambda s: s.started, reverse=True)
        return web.json_response({"sessions": [session_row(s) for s in found]})

    async def cast(self, request: web.Request) -> web.StreamResponse:
        """A recording as asciicast v2, streamed chunk by chunk from the recordings stream."""
        token = request["signin"].token
        chunks = self.api.replay(token, _session_id(request))
        first = await anext(chunks, b"")  # a missing recording is a 404, not an empty 200
        if request.method == "HEAD":
            await chunks.aclose()
            return web.Response(content_type="application/x-asciicast")
        response = web.StreamResponse(headers={"Content-Type": "application/x-asciicast"})
        await response.prepare(request)
        await response.write(first)
        try:
            async for chunk in chunks:
                await response.write(chunk)
        except RuneError as exc:
            return _cut_short(request, response, exc)
        await response.write_eof()
        return response


def _cut_short(request: web.Request, response: web.StreamResponse,
               exc: RuneError) -> web.StreamResponse:
    """A download that fails half-way must not look complete: end it without its last
    chunk, so the client reports an incomplete transfer."""
    log.warning("%s ended early: %s", request.path, exc.message)
    if request.transport is not None:
        request.transport.close()
    return response


def _event(item: pb.AuditEvent) -> dict[str, Any]:
    return {"seq": item.seq, **json.loads(item.json)}


def add(app: web.Application, api_key: web.AppKey) -> None:
    routes = Routes(app[api_key])
    app.router.add_get("/api/live", routes.live)
    app.router.add_get("/api/sessions/{sid}/observe", routes.observe)
    app.router.add_post("/api/sessions/{sid}/kill", routes.kill)
    app.router.add_get("/api/audit", routes.search)
    app.router.add_get("/api/audit/export", routes.export)
    app.router.add_get("/api/recordings", routes.recordings)
    app.router.add_get("/api/recordings/{sid}/cast", routes.cast)
