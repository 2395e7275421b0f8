"""The gRPC CopyService: `rune cp` admitted and lived through the one session core.

    init ─▶ CopyInit bounds ─▶ admission (SessionSpec; verb cp-read / cp-write)
         ─▶ cp_paths and --chown policy ─▶ resolve (one instance, or --all)
         ─▶ the core, once per instance, with the copy kind (apiserver/copy_relay.py)

A copy is therefore limited, registered (sessions list / kill), timed out and audited
as any session: session.started, then session.ended with files, bytes, per-file SHA-256
and a manifest digest (exit 1 when some file failed), or session.failed / denied.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from rune.apiserver.admission import DEFAULT_TIMEOUT
from rune.apiserver.copy_policy import check_paths
from rune.apiserver.copy_relay import Broadcast, CopyKind, asked_fields
from rune.apiserver.fanout import select
from rune.apiserver.service import ExecService

from rune.errors import InvalidArgument, RuneError
from rune.files.models import COPY_KINDS, check_path
from rune.models import InstanceInfo
from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
MAX_SOURCES = 4096
COPY_TIMEOUT = 3600.0


def copy_fields(init: pb.CopyInit) -> dict[str, Any]:
    """The SessionSpec of a copy: argv names what moves, for listings and audit."""
    upload = init.kind == "cp-write"
    argv = ["rune-cp", init.kind or "?", *init.paths, *([init.dest] if upload else [])]
    return {"namespace": init.namespace or "default", "target": init.target, "argv": argv,
            "timeout": init.timeout_seconds or COPY_TIMEOUT or DEFAULT_TIMEOUT}


def check_copy_init(init: pb.CopyInit) -> None:
    if init.kind not in COPY_KINDS:
        raise InvalidArgument(f"copy kind must be one of {', '.join(COPY_KINDS)}")
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
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def remote_paths(init: pb.CopyInit) -> list[str]:
    return list(init.paths) if init.kind == "cp-read" else [init.dest]


class CopyRun:
    """One copy request: its members (one per instance) and the client stream they share."""

    def __init__(self, service: CopyService, context: grpc.aio.ServicerContext,
                 init: pb.CopyInit, targets: list[InstanceInfo]) -> None:
        self.config = service.config
        self.context = context
        self.fanout = init.all
        self.targets = targets
        self.broadcast = Broadcast(context, len(targets) if init.kind == "cp-write" else 0,
                                   self.config.max_message, self.config.cp.limits.max_bytes)
        self._lock = asyncio.Lock()
        self.asked = asked_fields(init.kind, list(init.paths), init.dest)
        self.accept_pack = init.accept_pack  # the client reads packed small files
        self.request = {
            "kind": init.kind, "paths": list(init.paths) if init.kind == "cp-read" else [],
            "dest": init.dest if init.kind == "cp-write" else "",
            "multiple": init.multiple, "recursive": init.recursive,
            "follow": init.follow_links, "preserve": init.preserve, "chown": init.chown,
            "limits": self.config.cp.limits}

    async def write(self, response: pb.CopyResponse | bytes) -> None:
        """A response, or one pre-encoded (apiserver/wire.py)."""
        async with self._lock:  # every member answers on the one stream
            await self.context.write(response)


class CopyService(pb_grpc.CopyServiceServicer):
    def __init__(self, exec_service: ExecService, config: Any = None) -> None:
        self.core = exec_service.core
        self.admission = exec_service.admission
        self.config = exec_service.config

    async def StreamCopy(self, request_iterator: object,  # noqa: N802 - gRPC's name
                         context: grpc.aio.ServicerContext) -> None:
        try:
            await self._copy(context)
        except RuneError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], exc.message)

    async def _copy(self, context: grpc.aio.ServicerContext) -> None:
        init, identity, received = await self.admission.read_init(context,
                                                                  self.config.max_message)
        fields = copy_fields(init)
        try:
            check_copy_init(init)
        except RuneError as exc:
            from rune.apiserver.admission import SessionSpec

            self.admission.deny(identity, SessionSpec.model_construct(**fields), exc)
            raise
        spec = self.admission.admit(identity, fields, verb=init.kind)
        try:
            check_paths(self.admission.authz, identity, init.kind, spec.namespace,
                        remote_paths(init), bool(init.chown))
            if init.all:
                targets = select(self.core.directory.list(spec.namespace),
                                 pb.FanoutRequest(target=init.target, all=True),
                                 spec.namespace)
            else:
                targets = [self.core.directory.resolve(spec.namespace, spec.target)]
        except RuneError as exc:
            self.admission.deny(identity, spec, exc)
            raise
        run = CopyRun(self, context, init, targets)
        try:
            await self._members(run, identity, spec, targets, received)
        finally:
            run.broadcast.close()

    async def _members(self, run: CopyRun, identity: Any, spec: Any,
                       targets: list[InstanceInfo], received: float) -> None:
        if run.fanout:
            await run.write(pb.CopyResponse(plan=pb.FanoutPlan(instances=[
                pb.Instance(namespace=i.namespace, service=i.service,
                            instance_id=i.instance_id, state=i.state, host=i.host,
                            agent=i.agent, runner=i.runner) for i in targets]),
                accept_pack=True))
            await asyncio.gather(*(self._member(run, identity, spec, i, received)
                                   for i in targets))
        else:
            await self._member(run, identity, spec, targets[0], received)

    async def _member(self, run: CopyRun, identity: Any, spec: Any, info: InstanceInfo,
                      received: float) -> None:
        kind = CopyKind(run, info, run.request, self.config.cp.window)
        try:
            await self.core.run(identity, spec, info, kind, received=received)
        except RuneError as exc:
            # In-band, not as the call's status: a status that races the client's own
            # writes (an upload refused mid-stream) reaches it as "internal error".
            await run.write(pb.CopyResponse(instance_id=info.instance_id if run.fanout else "",
                                            error=pb.Error(code=exc.code, message=exc.message)))
        finally:
            run.broadcast.leave(info.instance_id)
