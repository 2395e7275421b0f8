"""Fan-out exec: one request runs a command on many instances, one core session each.

The request is admitted once (apiserver/admission.py: bounds, RBAC, command policy;
a refusal is audited as denied), then every selected instance is a member session
lived through the session core like a single exec: limited, registered (so `sessions
list/kill` see it), audited with the fan-out's id, timed out and killable on its own.
Members open in parallel, at most `max_parallel` at a time, each with its own window
so one slow or dead instance never stalls the rest; every frame goes back to the CLI
tagged with its instance id through one bounded queue and one writer. Each instance
ends with exactly one result.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from rune.apiserver.admission import SessionSpec, fanout_fields
from rune.apiserver.service import ExecService
from rune.apiserver.session import Session

from rune import frames
from rune.errors import Internal, InvalidArgument, NotFound, NotRunning, RuneError, Unavailable
from rune.models import INSTANCE_MARK, ExecOpened, InstanceInfo
from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_PARALLEL = 64
ALL_SERVICES = "*"


def select(instances: list[InstanceInfo], request: pb.FanoutRequest,
           namespace: str) -> list[InstanceInfo]:
    """The running instances a fan-out request names; raises when it names none or a bad one."""
    target = request.target
    if not target:
        raise InvalidArgument("no target given (a service name, or '*' for every service)")
    if INSTANCE_MARK in target:
        raise InvalidArgument(f'fan-out needs a service name, not the instance id "{target}"')
    pool = [i for i in instances if i.namespace == namespace
            and (target == ALL_SERVICES or i.service == target)]
    where = "namespace" if target == ALL_SERVICES else f'service "{target}" in namespace'
    if not pool:
        what = "instance in" if target == ALL_SERVICES else where
        raise NotFound(f'instance not found: no {what} "{namespace}"')
    if request.instances:
        by_id = {i.instance_id: i for i in pool}
        chosen = []
        for wanted in dict.fromkeys(request.instances):
            info = by_id.get(wanted)
            if info is None:
                raise NotFound(f'instance not found: no instance "{wanted}" of {where} '
                               f'"{namespace}"')
            if info.state != "running":
                raise NotRunning(f'instance not running: "{wanted}" is {info.state}')
            chosen.append(info)
        pool = chosen
    selector = dict(request.selector)
    if selector:
        pool = [i for i in pool if all(i.labels.get(k) == v for k, v in selector.items())]
    running = [i for i in pool if i.state == "running"]
    if not running:
        labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        matching = f" matching {labels}" if labels else ""
        raise NotRunning(f'instance not running: no running instance{matching} of {where} '
                         f'"{namespace}"')
    return sorted(running, key=lambda i: (i.service, i.agent, i.instance_id))


class FanoutService(pb_grpc.FanoutServiceServicer):
    def __init__(self, exec_service: ExecService) -> None:
        self.core = exec_service.core
        self.admission = exec_service.admission
        self.config = exec_service.config

    async def StreamFanout(self, request: pb.FanoutRequest,  # noqa: N802 - gRPC's name
                           context: grpc.aio.ServicerContext) -> None:
        try:
            await self._fanout(request, context)
        except RuneError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], exc.message)

    async def _fanout(self, request: pb.FanoutRequest,
                      context: grpc.aio.ServicerContext) -> None:
        identity = self.admission.authenticate(context.invocation_metadata())
        fanout_id = uuid.uuid4().hex
        fields = fanout_fields(request)
        if not (request.all or request.instances or request.selector):
            error = InvalidArgument("fan-out needs --all, --instances or --selector")
            self.admission.deny(identity, SessionSpec.model_construct(**fields), error,
                                fanout_id)
            raise error
        spec = self.admission.admit(identity, fields, fanout_id=fanout_id)
        try:
            targets = select(self.core.directory.list(spec.namespace), request,
                             spec.namespace)
        except RuneError as exc:
            self.admission.deny(identity, spec, exc, fanout_id)
            raise
        parallel = request.max_parallel or DEFAULT_MAX_PARALLEL
        parallel = max(1, min(parallel, self.config.fanout_max_parallel))
        log.info("fan-out %s start: user=%r %s/%s instances=%d parallel=%d", fanout_id,
                 identity.user, spec.namespace, spec.target, len(targets), parallel)
        run = FanoutRun(self, identity, spec, fanout_id, request.fail_fast, targets, parallel)
        await run.serve(context)


class FanoutMember:
    """The fan-out member session kind: output tagged with the instance, no stdin."""

    name = "fanout"

    def __init__(self, run: FanoutRun, info: InstanceInfo, window: int) -> None:
        self.run = run
        self.info = info
        self.window = window
        self.session: Session | None = None

    async def started(self, session: Session, opened: ExecOpened) -> None:
        self.session = session
        info = self.info
        await self.run.emit(info, started=pb.Started(
            session_id=session.record.id, instance_id=info.instance_id,
            host=session.record.host, agent=info.agent, service=info.service,
            runner=info.runner))

    async def output(self, session: Session, kind: int, data: bytes) -> None:
        if kind == frames.STDOUT:
            await self.run.emit(self.info, stdout=data)
        else:
            await self.run.emit(self.info, stderr=data)

    async def exited(self, session: Session, code: int, signal: int) -> None:
        return None  # the result follows once the core has closed the session

    async def feed(self, session: Session) -> None:
        await session.close_stdin()  # fan-out forwards no stdin


class FanoutRun:
    """One fan-out: the member sessions, the shared writer, fail-fast."""

    def __init__(self, service: FanoutService, identity: object, spec: SessionSpec,
                 fanout_id: str, fail_fast: bool, targets: list[InstanceInfo],
                 parallel: int) -> None:
        self.service = service
        self.identity = identity
        self.spec = spec
        self.fanout_id = fanout_id
        self.fail_fast = fail_fast
        self.targets = targets
        self.slots = asyncio.Semaphore(parallel)
        self.out: asyncio.Queue[pb.FanoutResponse | None] = asyncio.Queue(maxsize=parallel)
        self.reported: set[str] = set()
        self.failed = asyncio.Event()

    async def serve(self, context: grpc.aio.ServicerContext) -> None:
        writer = asyncio.create_task(self._write(context))
        await self.out.put(pb.FanoutResponse(plan=pb.FanoutPlan(instances=[
            pb.Instance(namespace=i.namespace, service=i.service, instance_id=i.instance_id,
                        state=i.state, host=i.host, agent=i.agent, runner=i.runner,
                        labels=i.labels) for i in self.targets])))
        tasks = {asyncio.create_task(self._one(i)): i for i in self.targets}
        try:
            pending = set(tasks)
            stopper = asyncio.create_task(self.failed.wait()) if self.fail_fast else None
            while pending:
                waiting = pending | {writer} | ({stopper} if stopper else set())
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if writer in done:
                    writer.result()  # the client is gone: raise, and the finally cleans up
                    raise Unavailable("the client stream ended")
                pending -= done
                if stopper in done:
                    stopper = None
                    for task in pending:
                        task.cancel()
            if stopper:
                stopper.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for info in self.targets:
                if info.instance_id not in self.reported:
                    await self._result(info, "cancelled", code=0, duration=0.0,
                                       error=RuneError("stopped by --fail-fast"))
            await self.out.put(None)
            await writer
        finally:
            for task in tasks:
                task.cancel()
            # Closing the remote ends is shielded inside each session; wait for them briefly.
            await asyncio.wait(tasks, timeout=5.0)
            writer.cancel()

    async def _write(self, context: grpc.aio.ServicerContext) -> None:
        while True:
            response = await self.out.get()
            if response is None:
                return
            await context.write(response)

    async def emit(self, info: InstanceInfo, **fields: object) -> None:
        await self.out.put(pb.FanoutResponse(instance_id=info.instance_id, **fields))

    async def _result(self, info: InstanceInfo, status: str, code: int, duration: float,
                      signal: int = 0, error: RuneError | None = None, host: str = "") -> None:
        result = pb.FanoutResult(status=status, code=code, signal=signal,
                                 duration_seconds=duration, host=host or info.host)
        if error is not None:
            result.error.CopyFrom(pb.Error(code=error.code, message=error.message))
        await self.emit(info, result=result)
        self.reported.add(info.instance_id)
        if status != "exited" or code or signal:
            self.failed.set()

    async def _one(self, info: InstanceInfo) -> None:
        async with self.slots:
            if self.failed.is_set() and self.fail_fast:
                return  # reported as cancelled by serve()
            began = time.monotonic()
            member = FanoutMember(self, info, self.service.config.fanout_window)
            try:
                record = await self.service.core.run(self.identity, self.spec, info, member,
                                                     fanout_id=self.fanout_id)
            except RuneError as exc:
                killed = member.session is not None and member.session.record.kill_reason
                if killed:
                    # Ended by an operator: reported like a command killed by SIGKILL.
                    await self._result(info, "killed", 137, time.monotonic() - began,
                                       error=exc, host=member.session.record.host)
                    return
                status = "unreachable" if isinstance(exc, Unavailable) else "failed"
                await self._result(info, status, exc.exit_code, time.monotonic() - began,
                                   error=exc)
            except Exception as exc:  # a bug must still end this instance with a result
                log.exception("fan-out session on %s failed", info.instance_id)
                await self._result(info, "failed", 255, time.monotonic() - began,
                                   error=Internal(f"internal error: {exc}"))
            else:
                await self._result(info, "exited", record.exit_code or 0,
                                   time.monotonic() - began, signal=record.signal,
                                   host=record.host)
