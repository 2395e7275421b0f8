"""Fan-out exec: one request runs a command on many instances, one core session each.

The request is admitted once (apiserver/admission.py: bounds, RBAC, command policy;
a refusal is audited as denied), then every selected instance is a member session
lived through the session core like a single exec: limited, registered (so `sessions
list/kill` see it), audited with the fan-out's id, timed out and killable on its own.
Members open in parallel, at most `max_parallel` at a time, each with its own window
so one slow or dead instance never stalls the rest; every frame goes back to the CLI
tagged with its instance id through one bounded queue and one writer, which packs what
is waiting into one FanoutBatch when the client asked for batches. The members' opens
leave per agent as batch opens (apiserver/open_batch.py, inside the core's open). Each
instance ends with exactly one result.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import grpc
from rune.apiserver.admission import SessionSpec, fanout_fields
from rune.apiserver.service import ExecService
from rune.apiserver.session import Session

from rune import frames
from rune.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    NotRunning,
    RuneError,
    Unavailable,
)
from rune.models import INSTANCE_MARK, ExecOpened, InstanceInfo
from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc
from rune.rollout import NEVER_RAN, Amount, MemberStatus

log = logging.getLogger(__name__)

DEFAULT_MAX_PARALLEL = 256
# A batched response (FanoutBatch) packs what waits up to this size: one gRPC write costs
# about a millisecond on this path, far more than the bytes, so a big fan-out writes few.
BATCH_BYTES = 1 << 20
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
            # Members past the user's session allowance would only fail: the window paces
            # them within it instead (at least one, which then says why it cannot start).
            room = self.core.limits.room(identity.user)
            cap = self.config.fanout_max_parallel
            rollout = Rollout.of(request, len(targets), cap if room is None else min(cap, room))
        except RuneError as exc:
            self.admission.deny(identity, spec, exc, fanout_id)
            raise
        log.info("fan-out %s start: user=%r %s/%s instances=%d %s", fanout_id,
                 identity.user, spec.namespace, spec.target, len(targets), rollout)
        run = FanoutRun(self, identity, spec, fanout_id, rollout, targets,
                        batched=request.batched)
        await run.serve(context)


@dataclass(frozen=True)
class Rollout:
    """How a fan-out's members are started: window, pacing, failure budget, canaries."""

    window: int
    batch_wait: float = 0.0
    max_fail: int | None = None
    canary: int = 0
    job_timeout: float = 0.0
    fail_fast: bool = False

    @classmethod
    def of(cls, request: pb.FanoutRequest, total: int, parallel_cap: int) -> Rollout:
        batch = Amount.parse(request.batch, "--batch")
        window = batch.of(total) if batch else (request.max_parallel or DEFAULT_MAX_PARALLEL)
        max_fail = Amount.parse(request.max_fail, "--max-fail", zero_ok=True)
        for value, what in ((request.batch_wait_seconds, "--batch-wait"),
                            (request.job_timeout_seconds, "--job-timeout")):
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"{what} {value!r} must be a finite number of seconds "
                                      ">= 0")
        return cls(window=max(1, min(window, parallel_cap)),
                   batch_wait=request.batch_wait_seconds,
                   max_fail=max_fail.of(total) if max_fail else None,
                   canary=min(request.canary, total), job_timeout=request.job_timeout_seconds,
                   fail_fast=request.fail_fast)

    def __str__(self) -> str:
        return (f"window={self.window} batch_wait={self.batch_wait:g} "
                f"max_fail={self.max_fail} canary={self.canary} "
                f"job_timeout={self.job_timeout:g} fail_fast={self.fail_fast}")


class FanoutMember:
    """The fan-out member session kind: output tagged with the instance, no stdin."""

    name = "fanout"
    no_input = True  # remote stdin is closed once started: no feed task per member

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
        await session.close_stdin()  # not called (no_input); what it would do


class FanoutRun:
    """One fan-out: starts members as its Rollout says, one writer, one result per member."""

    def __init__(self, service: FanoutService, identity: object, spec: SessionSpec,
                 fanout_id: str, rollout: Rollout, targets: list[InstanceInfo],
                 batched: bool = False) -> None:
        self.service = service
        self.batched = batched
        self.identity = identity
        self.spec = spec
        self.fanout_id = fanout_id
        self.rollout = rollout
        self.targets = targets
        self.out: asyncio.Queue[pb.FanoutResponse | None] = asyncio.Queue(
            maxsize=rollout.window)
        self.reported: set[str] = set()
        self.started: set[str] = set()
        self.not_ok = 0  # members that ended other than "exited 0"
        self.tally: Counter[str] = Counter()  # members per status (exited: per code)
        self.began = time.monotonic()
        self.unstarted = len(targets)
        self.running: set[asyncio.Task] = set()
        self._slot_freed = asyncio.Event()  # set when a running member ends
        self.queued = 0  # responses put on self.out
        self.written = 0  # of them, those written to the client's stream
        self.progress = asyncio.Condition()  # told when `written` grows

    async def _queue(self, response: pb.FanoutResponse) -> None:
        await self.out.put(response)
        self.queued += 1

    async def _sent(self, count: int) -> None:
        self.written += count
        if self.rollout.batch_wait:
            async with self.progress:
                self.progress.notify_all()

    async def _until_written(self, queued: int) -> None:
        """Returns once the first `queued` responses are on the client's stream."""
        async with self.progress:
            await self.progress.wait_for(lambda: self.written >= queued)

    async def serve(self, context: grpc.aio.ServicerContext) -> None:
        writer = asyncio.create_task(self._write(context))
        await self._queue(pb.FanoutResponse(plan=pb.FanoutPlan(instances=[
            pb.Instance(namespace=i.namespace, service=i.service, instance_id=i.instance_id,
                        state=i.state, host=i.host, agent=i.agent, runner=i.runner,
                        labels=i.labels) for i in self.targets])))
        schedule = asyncio.create_task(self._schedule())
        expired = False
        try:
            timeout = self.rollout.job_timeout or None
            done, _ = await asyncio.wait((schedule, writer), timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if writer in done:
                writer.result()  # the client is gone: raise, and the finally cleans up
                raise Unavailable("the client stream ended")
            if schedule in done:
                schedule.result()
            else:  # the job's time ran out: stop the running members, start no more
                expired = True
                await self._stop(schedule)
            limit = f"the job timed out after {self.rollout.job_timeout:g}s"
            for info in self.targets:
                if info.instance_id in self.reported:
                    continue
                if info.instance_id not in self.started:
                    await self._result(info, MemberStatus.SKIPPED, 0, 0.0,
                                       error=RuneError(f"not started: {limit}"))
                elif expired:
                    await self._result(info, MemberStatus.TIMED_OUT, 124, 0.0,
                                       error=DeadlineExceeded(limit))
                else:
                    await self._result(info, MemberStatus.CANCELLED, 0, 0.0,
                                       error=RuneError("stopped by --fail-fast"))
            await self.out.put(None)
            await writer
        finally:
            # Its members' starts and ends are logged at debug (oversight.py): this line
            # and the start line say what the run did.
            log.info("fan-out %s end: instances=%d reported=%d took=%.3fs %s", self.fanout_id,
                     len(self.targets), len(self.reported), time.monotonic() - self.began,
                     " ".join(f"{k}={n}" for k, n in sorted(self.tally.items())))
            await self._stop(schedule)
            writer.cancel()

    async def _stop(self, schedule: asyncio.Task) -> None:
        """Cancels the scheduler and the running members; their sessions close themselves
        (shielded), so wait for them briefly."""
        schedule.cancel()
        for task in self.running:
            task.cancel()
        await asyncio.wait({schedule, *self.running}, timeout=5.0)

    async def _schedule(self) -> None:
        """Canaries first; then a sliding window, until done or the failure budget is spent."""
        members = list(self.targets)
        canary = self.rollout.canary
        if canary:
            await self._start(members[:canary])
            members = members[canary:]
            if self.not_ok:
                await self._skip(members, f"not started: {self.not_ok} of the {canary} "
                                          "canaries did not succeed")
                return
        await self._start(members)

    async def _start(self, members: list[InstanceInfo]) -> None:
        for index, info in enumerate(members):
            while len(self.running) >= self.rollout.window:
                # One event, not asyncio.wait over the whole window: that adds and removes
                # a callback on every running member each time one slot frees.
                self._slot_freed.clear()
                await self._slot_freed.wait()
            why = self._stop_reason()
            if why is not None:
                status = MemberStatus.CANCELLED if self.rollout.fail_fast \
                    else MemberStatus.SKIPPED
                await self._skip(members[index:], why, status)
                break
            self.unstarted -= 1
            task = asyncio.create_task(self._one(info))
            self.running.add(task)
            task.add_done_callback(self._ended)
        while self.running:
            await asyncio.wait(self.running)

    def _ended(self, task: asyncio.Task) -> None:
        self.running.discard(task)
        self._slot_freed.set()

    def _stop_reason(self) -> str | None:
        if self.rollout.fail_fast and self.not_ok:
            return "stopped by --fail-fast"
        budget = self.rollout.max_fail
        if budget is not None and self.not_ok > budget:
            return f"not started: {self.not_ok} members failed (--max-fail {budget})"
        return None

    async def _skip(self, members: list[InstanceInfo], why: str,
                    status: MemberStatus = MemberStatus.SKIPPED) -> None:
        for info in members:
            self.unstarted -= 1
            await self._result(info, status, 0, 0.0, error=RuneError(why))

    async def _write(self, context: grpc.aio.ServicerContext) -> None:
        while True:
            response = await self.out.get()
            if response is None:
                return
            if not self.batched or self.out.empty():
                await context.write(response)
                await self._sent(1)
                continue
            responses, size, ended = [response], response.ByteSize(), False
            while not self.out.empty() and size < BATCH_BYTES:
                more = self.out.get_nowait()
                if more is None:
                    ended = True
                    break
                responses.append(more)
                size += more.ByteSize()
            await context.write(pb.FanoutResponse(batch=pb.FanoutBatch(responses=responses)))
            await self._sent(len(responses))
            if ended:
                return

    async def emit(self, info: InstanceInfo, **fields: object) -> None:
        await self._queue(pb.FanoutResponse(instance_id=info.instance_id, **fields))

    async def _result(self, info: InstanceInfo, status: MemberStatus, code: int,
                      duration: float, signal: int = 0, error: RuneError | None = None,
                      host: str = "") -> None:
        result = pb.FanoutResult(status=status, code=code, signal=signal,
                                 duration_seconds=duration, host=host or info.host)
        if error is not None:
            result.error.CopyFrom(pb.Error(code=error.code, message=error.message))
        await self.emit(info, result=result)
        self.reported.add(info.instance_id)
        self.tally[f"{status}:{code}" if status == MemberStatus.EXITED else str(status)] += 1
        if status not in NEVER_RAN and (status != MemberStatus.EXITED or code or signal):
            self.not_ok += 1
            if self.rollout.fail_fast:  # the first failure stops the running ones too
                for task in self.running - {asyncio.current_task()}:
                    task.cancel()

    async def _one(self, info: InstanceInfo) -> None:
        began = time.monotonic()
        self.started.add(info.instance_id)
        member = FanoutMember(self, info, self.service.config.fanout_window)
        try:
            record = await self.service.core.run(self.identity, self.spec, info, member,
                                                 fanout_id=self.fanout_id)
        except RuneError as exc:
            took = time.monotonic() - began
            if member.session is not None and member.session.record.kill_reason:
                # Ended by an operator: reported like a command killed by SIGKILL.
                await self._result(info, MemberStatus.KILLED, 137, took, error=exc,
                                   host=member.session.record.host)
            elif isinstance(exc, DeadlineExceeded):
                await self._result(info, MemberStatus.TIMED_OUT, exc.exit_code, took, error=exc)
            elif isinstance(exc, Unavailable):
                await self._result(info, MemberStatus.UNREACHABLE, exc.exit_code, took,
                                   error=exc)
            else:
                await self._result(info, MemberStatus.FAILED, exc.exit_code, took, error=exc)
        except Exception as exc:  # a bug must still end this instance with a result
            log.exception("fan-out session on %s failed", info.instance_id)
            await self._result(info, MemberStatus.FAILED, 255, time.monotonic() - began,
                               error=Internal(f"internal error: {exc}"))
        else:
            await self._result(info, MemberStatus.EXITED, record.exit_code or 0,
                               time.monotonic() - began, signal=record.signal,
                               host=record.host)
        finally:
            # The session and its kind hold each other: let go, so the ended member is
            # freed at once, not left for the cycle collector (thousands per fan-out).
            member.session = None
        if self.rollout.batch_wait and self.unstarted > 0:
            # The wait runs from when the client was told this member ended, so the next
            # one's start reaches it no sooner than batch_wait after; the slot stays taken.
            await self._until_written(self.queued)
            await asyncio.sleep(self.rollout.batch_wait)
