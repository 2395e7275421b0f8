"""The operators' RPCs of ExecService: audit trail, sessions list, replay, observe and kill.

Mixed into ExecService, which provides `auth`, `authz`, `admission`, `core`, `sessions`
and `oversight`.
Reading the audit trail, listing sessions and replaying one need the verb
`audit`; watching a live session's output needs `observe`; killing one needs
`admin`. Observing and killing are themselves audited: an observer is a session of the
core (admitted, limited, listed, killable), a kill is audited by the core wherever it was
asked.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from rune.apiserver.audit_search import AuditFilter, AuditSearch
from rune.apiserver.observe import ObserveKind
from rune.apiserver.session import kill_reason

from rune.errors import InvalidArgument, NotFound, RuneError, Unavailable
from rune.proto import exec_pb2 as pb
from rune.subjects import check_token


async def _abort(context: grpc.aio.ServicerContext, exc: RuneError) -> None:
    await context.abort(grpc.StatusCode[exc.grpc_status], exc.message)


log = logging.getLogger("apiserver.operators")


def _session_id(value: str) -> str:
    try:
        return check_token(value, "session id")
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


class OperatorRpcs:
    auth: Any
    authz: Any
    admission: Any
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
            # The owning apiserver's core ends it and audits session.killed, once.
            why = kill_reason(request.reason)
            if record is not None:
                self.core.kill(session_id, identity, why)
            elif not await board.kill(elsewhere, identity, why):
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
                             context: grpc.aio.ServicerContext) -> None:
        """An observer is a session of the core (apiserver/observe.py), written with
        context.write: its relay runs as the core's task, not as this generator."""
        try:
            identity = self._identity(context)
            spec, observed = self.admission.admit_observer(identity, request.session_id,
                                                           self.sessions.get)
            kind = ObserveKind(context, observed, self.sessions, self.oversight.recordings)
            await self.core.run(identity, spec, observed.instance, kind)
        except RuneError as exc:
            await _abort(context, exc)
