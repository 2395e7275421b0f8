"""The gRPC ExecService: one exec is admitted, then lived through the session core."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from rune.apiserver.admission import Admission, exec_fields
from rune.apiserver.operator_rpc import OperatorRpcs
from rune.apiserver.session import Session, SessionCore

from rune import frames
from rune.errors import InvalidArgument, RuneError
from rune.models import ExecOpened
from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc
from rune.protowire import EXEC_STDERR_TAG, EXEC_STDOUT_TAG, encode_bytes_field

log = logging.getLogger(__name__)


class ExecStream:
    """The exec session kind: a CLI's bidi stream on one side of the core."""

    name = "exec"

    def __init__(self, context: grpc.aio.ServicerContext, window: int,
                 max_message: int) -> None:
        self.context = context
        self.window = window
        self.max_message = max_message

    async def started(self, session: Session, opened: ExecOpened) -> None:
        record, instance = session.record, session.record.instance
        # Every status the server ends this stream with carries the session id: how
        # the client tells the server's verdict from a broken connection.
        self.context.set_trailing_metadata((("rune-session", record.id),))
        await self.context.write(pb.ExecResponse(started=pb.Started(
            session_id=record.id, instance_id=instance.instance_id, host=record.host,
            agent=instance.agent, service=instance.service, runner=instance.runner)))

    async def output(self, session: Session, kind: int, data: bytes) -> None:
        await self.context.write(encode_bytes_field(
            EXEC_STDOUT_TAG if kind == frames.STDOUT else EXEC_STDERR_TAG, data))

    async def exited(self, session: Session, code: int, signal: int) -> None:
        await self.context.write(pb.ExecResponse(exit=pb.Exit(code=code, signal=signal)))

    async def feed(self, session: Session) -> None:
        while True:
            request = await self.context.read()
            if request is grpc.aio.EOF:
                return
            if request.ByteSize() > self.max_message:
                raise InvalidArgument("message exceeds the maximum message size")
            kind = request.WhichOneof("msg")
            if kind == "stdin":
                await session.stdin(request.stdin)
            elif kind == "stdin_close":
                await session.close_stdin()
            elif kind == "resize":
                session.resize(request.resize.width, request.resize.height)
                # A read of an already-buffered message does not yield: a flood of resizes
                # would otherwise hold the loop (and every other session's heartbeats).
                await asyncio.sleep(0)
            elif kind == "signal":
                await session.signal(request.signal.number)
            else:
                raise InvalidArgument(f"unexpected {kind or 'empty'} message after init")


class ExecService(OperatorRpcs, pb_grpc.ExecServiceServicer):
    def __init__(self, core: SessionCore, admission: Admission) -> None:
        self.core = core
        self.admission = admission
        self.config = core.config
        self.directory = core.directory
        self.oversight = core.oversight
        self.sessions = core.sessions
        self.auth = admission.auth
        self.authz = admission.authz

    async def StreamExec(self, request_iterator: object,  # noqa: N802 - gRPC's name
                         context: grpc.aio.ServicerContext) -> None:
        try:
            await self._exec(context)
        except RuneError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], exc.message)

    async def _exec(self, context: grpc.aio.ServicerContext) -> None:
        init, identity, received = await self.admission.read_init(context,
                                                                  self.config.max_message)
        spec = self.admission.admit(identity, exec_fields(init))
        instance = self.admission.resolve(identity, spec)
        kind = ExecStream(context, self.config.window, self.config.max_message)
        await self.core.run(identity, spec, instance, kind, received=received)

    async def ListInstances(self, request: pb.ListInstancesRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> pb.ListInstancesResponse:
        try:
            identity = self.auth.authenticate(context.invocation_metadata() or ())
            namespace = None if request.all_namespaces else (request.namespace or "default")
            if namespace is not None:
                self.authz.authorize(identity, "list", namespace)
        except RuneError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], exc.message)
        visible: dict[str, Any] = {}  # with -A, only the namespaces the caller may list
        return pb.ListInstancesResponse(instances=[
            pb.Instance(namespace=i.namespace, service=i.service, instance_id=i.instance_id,
                        state=i.state, host=i.host, agent=i.agent, runner=i.runner,
                        labels=i.labels)
            for i in self.directory.list(namespace)
            if namespace is not None or visible.setdefault(
                i.namespace, self.authz.allows(identity, "list", i.namespace))
        ])
