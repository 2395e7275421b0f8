"""The gRPC CopyService: `rune cp` through the same controls as an exec.

    init ─▶ authenticate ─▶ authorize (cp-read / cp-write, cp_paths, --chown)
         ─▶ resolve (one instance, or every running one with --all)
         ─▶ acquire limits ─▶ register (sessions list / kill see it)
         ─▶ open a copy session on each agent ─▶ relay entries (apiserver/copy_relay.py)
         ─▶ on every way out: close the remote end, release, unregister, one audit event

The session core's objects are ExecService's (directory, limits, authorizer, sessions,
oversight): a copy is counted, listed, killed and audited as any session is.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from rune.apiserver.config import ApiServerConfig
from rune.apiserver.copy_policy import check_paths
from rune.apiserver.copy_relay import COPY_REPLIES, CopyMember, CopyRelay
from rune.apiserver.fanout import select
from rune.apiserver.relay import SessionRecord
from rune.apiserver.service import ExecService

from rune import audit as schema
from rune import bounds
from rune.errors import InvalidArgument, PermissionDenied, RuneError
from rune.files.models import COPY_KINDS, CopyOpen, check_path
from rune.link import LinkSettings, SessionLink
from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
MAX_SOURCES = 4096


def check_copy_init(init: pb.CopyInit) -> None:
    """The bounds of a copy request, before anything else looks at it."""
    if init.kind not in COPY_KINDS:
        raise InvalidArgument(f"copy kind must be one of {', '.join(COPY_KINDS)}")
    if not init.target:
        raise InvalidArgument("no target given")
    if len(init.paths) > MAX_SOURCES:
        raise InvalidArgument(f"too many sources: {len(init.paths)} > {MAX_SOURCES}")
    try:
        if init.kind == "cp-read":
            if not init.paths:
                raise InvalidArgument("no remote source given")
            for path in init.paths:
                check_path(path, "source")
        else:
            check_path(init.dest, "destination")
        if init.timeout_seconds:
            bounds.timeout(init.timeout_seconds)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def remote_paths(init: pb.CopyInit) -> list[str]:
    return list(init.paths) if init.kind == "cp-read" else [init.dest]


class CopyService(pb_grpc.CopyServiceServicer):
    def __init__(self, exec_service: ExecService, config: ApiServerConfig) -> None:
        self.exec = exec_service
        self.config = config
        self.relay = CopyRelay(config)

    async def StreamCopy(self, request_iterator: object,  # noqa: N802 - gRPC's name
                         context: grpc.aio.ServicerContext) -> None:
        try:
            await self._copy(context)
        except RuneError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], exc.message)

    async def _copy(self, context: grpc.aio.ServicerContext) -> None:
        first = await context.read()
        svc = self.exec
        identity = svc.auth.authenticate(context.invocation_metadata() or ())
        if first is grpc.aio.EOF or first.WhichOneof("msg") != "init":
            raise InvalidArgument("the first message of a copy stream must be init")
        if first.ByteSize() > self.config.max_message:
            raise InvalidArgument("init message exceeds the maximum message size")
        init = first.init
        namespace = init.namespace or "default"
        try:
            check_copy_init(init)
            try:
                svc.authz.authorize(identity, init.kind, namespace)
                check_paths(svc.authz, identity, init.kind, namespace, remote_paths(init),
                            bool(init.chown))
            except PermissionDenied as exc:
                log.warning("denied: user=%s namespace=%s target=%s %s %s: %s", identity.user,
                            namespace, init.target, init.kind, remote_paths(init), exc)
                raise
            if init.all:
                targets = select(list(svc.directory.instances.values()),
                                 pb.FanoutRequest(target=init.target, all=True), namespace)
                targets = [svc.directory.effective(i) for i in targets]
            else:
                targets = [svc.directory.resolve(namespace, init.target)]
        except RuneError as exc:
            self._audit(schema.DENIED, identity, init, None, code=exc.code, reason=exc.message)
            raise
        members: list[CopyMember] = []
        try:
            for info in targets:
                try:
                    svc.limits.acquire(identity.user, info.agent)
                except RuneError as exc:
                    self._audit(schema.DENIED, identity, init, None, code=exc.code,
                                reason=exc.message)
                    raise
                members.append(self._member(identity, init, info))
            try:
                await self._run(context, init, members)
            except RuneError as exc:
                for member in members:
                    if member.error is None and member.done is None:
                        member.error = exc
                raise
        finally:
            for member in members:
                await self._release(identity, init, member)

    def _member(self, identity: object, init: pb.CopyInit, info: object) -> CopyMember:
        svc = self.exec
        record = SessionRecord(id=svc.relay.new_session_id(), user=identity.user,
                               instance=info, argv=["rune-cp", init.kind, *remote_paths(init)],
                               tty=False)
        svc.sessions[record.id] = record
        svc.directory.busy[info.key] += 1
        timeout = min(init.timeout_seconds or 3600.0, self.config.max_timeout)
        request = CopyOpen(
            kind=init.kind, session_id=record.id, namespace=info.namespace,
            instance_id=info.instance_id, paths=list(init.paths) if init.kind == "cp-read"
            else [], dest=init.dest, multiple=init.multiple, recursive=init.recursive,
            follow=init.follow_links, preserve=init.preserve, chown=init.chown,
            timeout=timeout, user=identity.user, window=self.config.window,
            heartbeat=self.config.heartbeat, lost_after=self.config.lost_after,
            limits=self.config.cp.limits)
        link = SessionLink(
            svc.relay.nc,
            send_subject=svc.relay.subjects.session_in(info.agent, record.id),
            recv_subject=svc.relay.subjects.session_out(info.agent, record.id),
            accepts=COPY_REPLIES,
            settings=LinkSettings(window=self.config.window, heartbeat=self.config.heartbeat,
                                  lost_after=self.config.lost_after),
            peer=f"agent {info.agent}",
            probe=lambda: svc.relay._agent_gone(info.agent))
        return CopyMember(info=info, record=record, request=request, link=link,
                          began=time.monotonic(), identity=identity)

    async def _run(self, context: grpc.aio.ServicerContext, init: pb.CopyInit,
                   members: list[CopyMember]) -> None:
        fanout = init.all
        if fanout:
            await context.write(pb.CopyResponse(plan=pb.FanoutPlan(instances=[
                pb.Instance(namespace=m.info.namespace, service=m.info.service,
                            instance_id=m.info.instance_id, state=m.info.state,
                            host=m.info.host, agent=m.info.agent, runner=m.info.runner)
                for m in members])))
        await asyncio.gather(*(self.relay.open(self.exec.relay, m, fanout) for m in members))
        context.set_trailing_metadata((("rune-session", members[0].record.id),))
        for member in members:
            if member.error is None:
                await context.write(pb.CopyResponse(
                    instance_id=member.info.instance_id if fanout else "",
                    started=pb.Started(session_id=member.record.id,
                                       instance_id=member.info.instance_id,
                                       host=member.record.host, agent=member.info.agent,
                                       service=member.info.service,
                                       runner=member.info.runner)))
            else:
                await context.write(self.relay.error_response(member, fanout))
        await self.relay.run(context, init, members, fanout)

    async def _release(self, identity: object, init: pb.CopyInit, member: CopyMember) -> None:
        svc = self.exec
        try:
            await self.relay.close(member)
        finally:
            svc.limits.release(identity.user, member.info.agent)
            svc.directory.busy[member.info.key] -= 1
            svc.sessions.pop(member.record.id, None)
            self._ended(identity, init, member)

    def _ended(self, identity: object, init: pb.CopyInit, member: CopyMember) -> None:
        record, done = member.record, member.done
        fields = {"session_id": record.id, "instance": member.info.instance_id,
                  "service": member.info.service, "agent": member.info.agent,
                  "host": record.host or member.info.host, "runner": member.info.runner,
                  "duration": round(time.monotonic() - member.began, 3),
                  "bytes_in": member.bytes_to_agent, "bytes_out": member.bytes_from_agent}
        if done is not None and member.error is None and not record.kill_reason:
            failed = int(done.get("failed", 0))
            self._audit(schema.ENDED, identity, init, fields, exit_code=1 if failed else 0,
                        signal=0, files=done.get("files", 0), bytes=done.get("bytes", 0),
                        failed_files=failed, manifest_sha256=done.get("manifest_sha256", ""),
                        sha256=done.get("sha256", {}),
                        outcome="partial" if failed else "success")
            return
        error = member.error
        code, reason = ("killed", record.kill_reason) if record.kill_reason else \
            (error.code, error.message) if error is not None else \
            ("cancelled", "the client went away")
        self._audit(schema.FAILED, identity, init, fields, code=code, reason=reason,
                    stage="running" if member.opened else "open", outcome="failed")

    def _audit(self, event: str, identity: object, init: pb.CopyInit, where: dict | None,
               **more: object) -> None:
        """One event per copy: who, where, which way, what, and how it ended."""
        upload = init.kind == "cp-write"
        fields = {"user": identity.user, "groups": list(identity.groups),
                  "namespace": init.namespace or "default", "target": init.target,
                  "kind": init.kind, "direction": "upload" if upload else "download",
                  "paths": list(init.paths), "dest": init.dest if upload else "",
                  "argv": ["rune-cp", init.kind, *list(init.paths)[:16],
                           *([init.dest] if upload else [])],
                  "tty": False, "workdir": "", "env_keys": [], **(where or {}), **more}
        self.exec.oversight._emit(schema.make_event(event, **fields))
