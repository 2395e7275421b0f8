"""The gRPC ExecService: authenticate, authorize, resolve, then hand over to the relay."""

from __future__ import annotations

import logging
import time

import grpc
from rune.apiserver.auth import Authenticator, Authorizer
from rune.apiserver.config import LimitsConfig
from rune.apiserver.directory import InstanceDirectory
from rune.apiserver.limits import SessionLimits, check_init
from rune.apiserver.operator_rpc import OperatorRpcs
from rune.apiserver.oversight import Oversight
from rune.apiserver.relay import Relay, SessionRecord

from rune.errors import InvalidArgument, PermissionDenied, RuneError
from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class ExecService(OperatorRpcs, pb_grpc.ExecServiceServicer):
    def __init__(self, directory: InstanceDirectory, relay: Relay, auth: Authenticator,
                 authz: Authorizer, limits: LimitsConfig | None = None,
                 oversight: Oversight | None = None) -> None:
        self.limits = SessionLimits(limits or LimitsConfig())
        self.directory = directory
        self.relay = relay
        self.auth = auth
        self.authz = authz
        self.sessions: dict[str, SessionRecord] = {}
        self.oversight = oversight or Oversight()
        relay.on_started = self.oversight.started

    async def StreamExec(self, request_iterator: object,  # noqa: N802 - gRPC's name
                         context: grpc.aio.ServicerContext) -> None:
        try:
            await self._exec(context)
        except RuneError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], exc.message)

    async def _exec(self, context: grpc.aio.ServicerContext) -> None:
        # Read init before refusing a token: ending the call while the client still writes
        # its first message makes gRPC report an internal error instead of our status.
        first = await context.read()
        received = time.monotonic()
        identity = self.auth.authenticate(context.invocation_metadata() or ())
        if first is grpc.aio.EOF or first.WhichOneof("msg") != "init":
            raise InvalidArgument("the first message of a stream must be init")
        if first.ByteSize() > self.relay.config.max_message:
            raise InvalidArgument("init message exceeds the maximum message size")
        init = first.init
        check_init(init, self.limits.limits)
        namespace = init.namespace or "default"
        try:
            if not init.target:
                raise InvalidArgument("no target given")
            if not init.command:
                raise InvalidArgument("no command given")
            try:
                self.authz.authorize(identity, "exec-tty" if init.tty else "exec", namespace,
                                     list(init.command))
            except PermissionDenied as exc:
                log.warning("denied: user=%s namespace=%s target=%s argv0=%s: %s",
                            identity.user, namespace, init.target, init.command[0], exc)
                raise
            instance = self.directory.resolve(namespace, init.target)
            self.limits.acquire(identity.user, instance.agent)
        except RuneError as exc:
            self.oversight.denied(identity, init, exc)
            raise
        record = SessionRecord(id=self.relay.new_session_id(), user=identity.user,
                               instance=instance, argv=list(init.command), tty=init.tty)
        self.sessions[record.id] = record
        self.directory.busy[instance.key] += 1
        self.oversight.opening(record, identity, init, received)
        outcome: BaseException | None = None
        try:
            await self.relay.run(context, init, instance, record)
        except BaseException as exc:
            outcome = exc
            raise
        finally:
            self.limits.release(identity.user, instance.agent)
            self.directory.busy[instance.key] -= 1
            self.sessions.pop(record.id, None)
            self.oversight.ended(record, outcome)

    async def ListInstances(self, request: pb.ListInstancesRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> pb.ListInstancesResponse:
        try:
            identity = self.auth.authenticate(context.invocation_metadata() or ())
            namespace = None if request.all_namespaces else (request.namespace or "default")
            if namespace is not None:
                self.authz.authorize(identity, "list", namespace)
        except RuneError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], exc.message)
        visible = {}  # with -A, only the namespaces the caller may list
        return pb.ListInstancesResponse(instances=[
            pb.Instance(namespace=i.namespace, service=i.service, instance_id=i.instance_id,
                        state=i.state, host=i.host, agent=i.agent, runner=i.runner,
                        labels=i.labels)
            for i in self.directory.list(namespace)
            if namespace is not None or visible.setdefault(
                i.namespace, self.authz.allows(identity, "list", i.namespace))
        ])
