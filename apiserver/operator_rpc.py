"""The operators' RPCs of ExecService: audit trail, sessions list, replay, observe and kill.

Mixed into ExecService, which provides `auth`, `authz`, `sessions` and `oversight`.
Reading the audit trail, listing sessions and replaying one need the verb
`audit`; watching a live session's output needs `observe`; killing one needs
`admin`. Observing and killing are themselves audited.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from rune.apiserver import observe
from rune.apiserver.audit_search import AuditFilter, AuditSearch

from rune import audit as schema
from rune.errors import InvalidArgument, NotFound, RuneError, Unavailable
from rune.proto import exec_pb2 as pb
from rune.subjects import check_token


async def _abort(context: grpc.aio.ServicerContext, exc: RuneError) -> None:
    await context.abort(grpc.StatusCode[exc.grpc_status], exc.message)


log = logging.getLogger("apiserver.operators")

MAX_REASON = 256
OBSERVE_POLL = 0.5  # seconds between checks that an observed session still runs


def _reason(text: str) -> str:
    """A kill reason as the session's user will see it: printable, bounded."""
    return "".join(c if c.isprintable() else "?" for c in text.strip())[:MAX_REASON]


def _session_id(value: str) -> str:
    try:
        return check_token(value, "session id")
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


class OperatorRpcs:
    auth: Any
    authz: Any
    core: Any
    sessions: dict
    oversight: Any

    def _identity(self, context: grpc.aio.ServicerContext) -> Any:
        return self.auth.authenticate(context.invocation_metadata() or ())

    async def StreamAudit(self, request: pb.AuditRequest,  # noqa: N802 - gRPC's name
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AuditEvent]:
        try:
            identity = self._identity(context)
            namespace = None if request.all_namespaces else (request.namespace or "default")
            self.authz.authorize(identity, "audit", namespace or "*")
            auditor = self.oversight.auditor
            if auditor is None:
                raise Unavailable("auditing is not enabled on this API server")
            since = time.time() - request.since_seconds if request.since_seconds > 0 else None
            async for event in auditor.query(namespace, request.user or None, since,
                                             request.follow):
                yield pb.AuditEvent(json=json.dumps(event, sort_keys=True))
        except RuneError as exc:
            await _abort(context, exc)

    async def ListSessions(self, request: pb.ListSessionsRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.ListSessionsResponse:
        try:
            identity = self._identity(context)
            namespace = None if request.all_namespaces else (request.namespace or "default")
            visible = self._visible(identity, namespace, partial=request.active_only)
            now, monotonic = time.time(), time.monotonic()
            found = []
            for r in list(self.sessions.values()):
                if (namespace is None or r.instance.namespace == namespace) and \
                        visible(r.instance.namespace):
                    found.append(pb.SessionInfo(
                        session_id=r.id, state="active", user=r.user,
                        namespace=r.instance.namespace, instance_id=r.instance.instance_id,
                        command=r.argv, tty=r.tty, started=r.started,
                        duration=now - r.started, recorded=r.tap is not None,
                        host=r.host or r.instance.host,
                        idle=0.0 if r.writing else max(0.0, monotonic - r.last_io),
                        bytes_in=r.bytes_in, bytes_out=r.bytes_out, fanout_id=r.fanout_id))
            board = self.core.board
            for r in board.remote() if board is not None else ():  # other apiservers'
                if (namespace is None or r["namespace"] == namespace) and \
                        visible(r["namespace"]):
                    found.append(pb.SessionInfo(
                        session_id=r["session_id"], state="active", user=r["user"],
                        namespace=r["namespace"], instance_id=r["instance"],
                        command=r["argv"], tty=r["tty"], started=r["started"],
                        duration=now - r["started"], recorded=r["tty"]))
            active = {s.session_id for s in found}
            recordings = None if request.active_only else self.oversight.recordings
            for m in (await recordings.list()) if recordings is not None else ():
                if m.get("session_id") in active:
                    continue
                if namespace is not None and m.get("namespace") != namespace:
                    continue
                exited = m.get("exit_code") is not None
                found.append(pb.SessionInfo(
                    # "incomplete": its apiserver stopped (or runs elsewhere) mid-session.
                    session_id=m["session_id"],
                    state="recorded" if m.get("state") == "complete" else "incomplete",
                    user=m.get("user", ""),
                    namespace=m.get("namespace", ""), instance_id=m.get("instance", ""),
                    command=m.get("argv", []), tty=True, started=m.get("started", 0.0),
                    duration=m.get("duration") or 0.0, exit_code=m.get("exit_code") or 0,
                    signal=m.get("signal") or 0, recorded=True, exited=exited))
        except RuneError as exc:
            await _abort(context, exc)
        found.sort(key=lambda s: s.started)
        return pb.ListSessionsResponse(sessions=found)

    async def ReplaySession(self, request: pb.ReplayRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.CastChunk]:
        try:
            identity = self._identity(context)
            session_id = _session_id(request.session_id)
            recordings = self.oversight.recordings
            if recordings is None:
                raise NotFound("session recording is not enabled on this API server")
            meta = await recordings.meta(session_id)
            if meta is None:
                raise NotFound(f"no recording of session {session_id}")
            self.authz.authorize(identity, "audit", meta.get("namespace") or "default")
            async for chunk in recordings.cast(session_id):
                yield pb.CastChunk(data=chunk)
        except RuneError as exc:
            await _abort(context, exc)

    async def KillSession(self, request: pb.KillSessionRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.KillSessionResponse:
        try:
            identity = self._identity(context)
            session_id = _session_id(request.session_id)
            record = self.sessions.get(session_id)
            board = self.core.board
            elsewhere = board.find(session_id) if record is None and board else None
            if record is None and elsewhere is None:
                raise NotFound(f"no active session {session_id}")
            namespace = record.instance.namespace if record else elsewhere["namespace"]
            self.authz.authorize(identity, "admin", namespace)
            text = _reason(request.reason)
            why = f": {text}" if text else ""
            # The user whose session ends reads `Error: session ended by <operator>: <why>`.
            reason = f"ended by {identity.user}{why}"
            if record is not None:
                self._operator_event(schema.KILLED, identity, record, reason=text)
                self.core.kill(session_id, reason)
            elif not await board.kill(elsewhere, reason):
                raise Unavailable(f"session {session_id} runs on apiserver "
                                  f"{elsewhere['apiserver']}, which did not answer the kill")
        except RuneError as exc:
            await _abort(context, exc)
        return pb.KillSessionResponse(killed=True)

    # --- dashboards: search, follow, observe -------------------------------------------

    def _visible(self, identity: Any, namespace: str | None,
                 partial: bool = True) -> Callable[[str], bool]:
        """Which namespaces' records the caller may read (verb audit).

        One namespace: authorized up front. All of them: with `partial`, each namespace as
        it comes (a caller without audit anywhere sees nothing); without, "*" is required.
        """
        if namespace is not None or not partial:
            self.authz.authorize(identity, "audit", namespace or "*")
            return lambda _ns: True
        if self.authz.allows(identity, "audit", "*"):
            return lambda _ns: True
        seen: dict[str, bool] = {}
        return lambda ns: seen.setdefault(ns, self.authz.allows(identity, "audit", ns))

    def _search(self) -> AuditSearch:
        auditor = self.oversight.auditor
        if auditor is None:
            raise Unavailable("auditing is not enabled on this API server")
        return AuditSearch(auditor.nc, auditor.subjects)

    def _operator_event(self, kind: str, identity: Any, record: Any, **extra: Any) -> None:
        """An operator acted on someone's live session: who, on which session, why."""
        i = record.instance
        event = schema.make_event(
            kind, source="apiserver", user=identity.user, groups=list(identity.groups),
            namespace=i.namespace, target=i.instance_id, argv=list(record.argv),
            tty=record.tty, session_id=record.id, session_user=record.user,
            instance=i.instance_id, service=i.service, agent=i.agent,
            host=record.host or i.host, **extra)
        if self.oversight.auditor is not None:
            self.oversight.auditor.emit(event)
        log.info("%s session_id=%s by=%s user=%s", kind, record.id, identity.user, record.user,
                 extra={"fields": event})

    async def SearchAudit(self, request: pb.AuditSearchRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.AuditSearchResponse:
        try:
            identity = self._identity(context)
            f = AuditFilter.from_request(request)
            visible = self._visible(identity, f.namespace or None)
            found, cursor, scanned = await self._search().page(f, request.cursor,
                                                                request.limit, visible)
        except RuneError as exc:
            await _abort(context, exc)
        return pb.AuditSearchResponse(
            events=[pb.AuditEvent(json=json.dumps(e, sort_keys=True), seq=seq)
                    for seq, e in found], next_cursor=cursor, scanned=scanned)

    async def FollowAudit(self, request: pb.AuditSearchRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AuditEvent]:
        try:
            identity = self._identity(context)
            f = AuditFilter.from_request(request)
            visible = self._visible(identity, f.namespace or None)
            async for seq, event in self._search().follow(f, request.cursor, visible):
                yield pb.AuditEvent(json=json.dumps(event, sort_keys=True), seq=seq)
        except RuneError as exc:
            await _abort(context, exc)

    async def ObserveSession(self, request: pb.ObserveRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ObserveChunk]:
        try:
            identity = self._identity(context)
            session_id = _session_id(request.session_id)
            record = self.sessions.get(session_id)
            if record is None:
                raise NotFound(f"no active session {session_id} on this API server")
            self.authz.authorize(identity, "observe", record.instance.namespace)
            self._operator_event(schema.OBSERVED, identity, record)
        except RuneError as exc:
            await _abort(context, exc)
            return
        # Watch before reading the recording, with no await between: every byte is either
        # in the recording up to `upto` or in this observer's queue, never in neither.
        observer = observe.hub.watch(session_id)
        tap = record.tap
        upto = None
        if tap is not None:
            tap.flush()
            upto = tap.bytes
        try:
            if upto:
                async for chunk in self._recorded_so_far(session_id, upto):
                    yield chunk
            while True:
                data = await observer.get(OBSERVE_POLL)
                if data:
                    yield pb.ObserveChunk(data=data, dropped=observer.dropped)
                elif self.sessions.get(session_id) is not record:
                    yield pb.ObserveChunk(ended=True, dropped=observer.dropped,
                                          reason=record.kill_reason or "the session ended")
                    return
        finally:
            observe.hub.unwatch(session_id, observer)

    async def _recorded_so_far(self, session_id: str,
                               upto: int) -> AsyncIterator[pb.ObserveChunk]:
        """The recording's output up to byte `upto`, with its terminal sizes."""
        recordings = self.oversight.recordings
        if recordings is None:
            return
        await recordings.publisher.flush(2.0)
        sent = 0
        try:
            async for block in recordings.cast(session_id):
                for line in block.decode("utf-8", "surrogateescape").splitlines():
                    chunk = _cast_line(line)
                    if chunk is None:
                        continue
                    if chunk.data:
                        chunk.data = chunk.data[:upto - sent]
                        sent += len(chunk.data)
                    yield chunk
                    if sent >= upto:
                        return
        except RuneError:
            return  # nothing stored yet: the live part follows


def _cast_line(line: str) -> pb.ObserveChunk | None:
    """One asciicast v2 line as an observer chunk (header and resizes give the size)."""
    try:
        item = json.loads(line)
    except ValueError:
        return None
    if isinstance(item, dict):
        return pb.ObserveChunk(width=int(item.get("width") or 0),
                               height=int(item.get("height") or 0))
    if not isinstance(item, list) or len(item) != 3:
        return None
    _, code, text = item
    if code == "o":
        return pb.ObserveChunk(data=str(text).encode("utf-8", "surrogateescape"))
    if code == "r":
        width, _, height = str(text).partition("x")
        if width.isdigit() and height.isdigit():
            return pb.ObserveChunk(width=int(width), height=int(height))
    return None
