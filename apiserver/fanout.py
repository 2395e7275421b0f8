"""Fan-out exec: one request runs a command on many instances, one relayed session each.

Each instance gets its own session and SessionLink (its own window, so one slow
or dead instance never stalls the rest). Sessions open in parallel, at most
`max_parallel` at a time; every frame goes back to the CLI tagged with its
instance id through one bounded queue and one writer, so the apiserver holds no
more than the sessions' windows. Each instance ends with exactly one result.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from rune.apiserver.relay import SessionRecord
from rune.apiserver.service import ExecService

from rune import errors, frames
from rune.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    NotRunning,
    RuneError,
    Unavailable,
)
from rune.models import INSTANCE_MARK, ExecOpen, InstanceInfo
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
        self.exec = exec_service
        self.relay = exec_service.relay
        self.config = exec_service.relay.config

    async def StreamFanout(self, request: pb.FanoutRequest,  # noqa: N802 - gRPC's name
                           context: grpc.aio.ServicerContext) -> None:
        try:
            await self._fanout(request, context)
        except RuneError as exc:
            await context.abort(grpc.StatusCode[exc.grpc_status], exc.message)

    async def _fanout(self, request: pb.FanoutRequest,
                      context: grpc.aio.ServicerContext) -> None:
        identity = self.exec.auth.authenticate(context.invocation_metadata() or ())
        namespace = request.namespace or "default"
        if not request.command:
            raise InvalidArgument("no command given")
        if not (request.all or request.instances or request.selector):
            raise InvalidArgument("fan-out needs --all, --instances or --selector")
        self.exec.authz.authorize(identity, "exec", namespace, list(request.command))
        targets = select(list(self.exec.directory.instances.values()), request, namespace)
        parallel = request.max_parallel or DEFAULT_MAX_PARALLEL
        parallel = max(1, min(parallel, self.config.fanout_max_parallel))
        log.info("fan-out start: user=%s %s/%s instances=%d parallel=%d argv0=%s",
                 identity.user, namespace, request.target, len(targets), parallel,
                 request.command[0])
        run = FanoutRun(self, identity.user, request, targets, parallel)
        await run.serve(context)


class FanoutRun:
    """One fan-out: the per-instance sessions, the shared writer, fail-fast."""

    def __init__(self, service: FanoutService, user: str, request: pb.FanoutRequest,
                 targets: list[InstanceInfo], parallel: int) -> None:
        self.service = service
        self.user = user
        self.request = request
        self.targets = targets
        self.slots = asyncio.Semaphore(parallel)
        self.out: asyncio.Queue[pb.FanoutResponse | None] = asyncio.Queue(maxsize=parallel)
        self.reported: set[str] = set()
        self.failed = asyncio.Event()
        self.fanout_id = uuid.uuid4().hex

    async def serve(self, context: grpc.aio.ServicerContext) -> None:
        writer = asyncio.create_task(self._write(context))
        await self.out.put(pb.FanoutResponse(plan=pb.FanoutPlan(instances=[
            pb.Instance(namespace=i.namespace, service=i.service, instance_id=i.instance_id,
                        state=i.state, host=i.host, agent=i.agent, runner=i.runner,
                        labels=i.labels) for i in self.targets])))
        tasks = {asyncio.create_task(self._one(i)): i for i in self.targets}
        try:
            pending = set(tasks)
            stopper = asyncio.create_task(self.failed.wait()) if self.request.fail_fast \
                else None
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
            # Closing the remote ends is shielded inside each task; wait for them briefly.
            await asyncio.wait(tasks, timeout=5.0)
            writer.cancel()

    async def _write(self, context: grpc.aio.ServicerContext) -> None:
        while True:
            response = await self.out.get()
            if response is None:
                return
            await context.write(response)

    async def _emit(self, info: InstanceInfo, **fields: object) -> None:
        await self.out.put(pb.FanoutResponse(instance_id=info.instance_id, **fields))

    async def _result(self, info: InstanceInfo, status: str, code: int, duration: float,
                      signal: int = 0, error: RuneError | None = None, host: str = "") -> None:
        result = pb.FanoutResult(status=status, code=code, signal=signal,
                                 duration_seconds=duration, host=host or info.host)
        if error is not None:
            result.error.CopyFrom(pb.Error(code=error.code, message=error.message))
        await self._emit(info, result=result)
        self.reported.add(info.instance_id)
        if status in ("unreachable", "failed") or code or signal:
            self.failed.set()

    async def _one(self, info: InstanceInfo) -> None:
        async with self.slots:
            if self.failed.is_set() and self.request.fail_fast:
                return  # reported as cancelled by serve()
            began = time.monotonic()
            try:
                await self._session(info, began)
            except RuneError as exc:
                status = "unreachable" if isinstance(exc, Unavailable) else "failed"
                code = exc.exit_code
                await self._result(info, status, code, time.monotonic() - began, error=exc)
            except Exception as exc:  # a bug must still end this instance with a result
                log.exception("fan-out session on %s failed", info.instance_id)
                await self._result(info, "failed", 255, time.monotonic() - began,
                                   error=Internal(f"internal error: {exc}"))

    async def _session(self, info: InstanceInfo, began: float) -> None:
        service = self.service
        relay, config, request = service.relay, service.config, self.request
        timeout = min(request.timeout_seconds or 300.0, config.max_timeout)
        record = SessionRecord(id=relay.new_session_id(), user=self.user, instance=info,
                               argv=list(request.command), tty=False)
        record.fanout_id = self.fanout_id  # dashboards group the members (ListSessions)
        opening = ExecOpen(
            session_id=record.id, namespace=info.namespace, instance_id=info.instance_id,
            argv=list(request.command), env=dict(request.env), workdir=request.workdir,
            tty=False, timeout=timeout, user=self.user, window=config.fanout_window,
            heartbeat=config.heartbeat, lost_after=config.lost_after)
        link = relay.session_link(info, record.id, config.fanout_window)
        await link.open()
        sessions, busy = service.exec.sessions, service.exec.directory.busy
        sessions[record.id] = record
        busy[info.key] += 1
        finished = False
        try:
            opened = await relay.open_session(info, opening)
            host = opened.host or info.host
            await self._emit(info, started=pb.Started(
                session_id=record.id, instance_id=info.instance_id, host=host,
                agent=info.agent, service=info.service, runner=info.runner))
            await link.send(frames.STDIN_EOF)  # fan-out forwards no stdin
            try:
                code, sig = await asyncio.wait_for(
                    self._pump(info, link), timeout + config.heartbeat * 3)
            except TimeoutError:
                raise DeadlineExceeded(f"command timed out after {timeout:g}s") from None
            record.exit_code, record.signal = code, sig
            finished = True
            await self._result(info, "exited", code, time.monotonic() - began, signal=sig,
                               host=host)
        finally:
            record.bytes_in, record.bytes_out = link.bytes_out, link.bytes_in
            busy[info.key] -= 1
            sessions.pop(record.id, None)
            if not finished:
                await asyncio.shield(relay.close_remote(link))
            await link.close()

    async def _pump(self, info: InstanceInfo, link: object) -> tuple[int, int]:
        """Forwards one session's output; returns its (code, signal)."""
        while True:
            try:
                kind, payload = await link.recv()
            except Unavailable as exc:
                raise Unavailable(f"{exc}; the session ended") from None
            if kind == frames.STDOUT:
                await self._emit(info, stdout=payload)
            elif kind == frames.STDERR:
                await self._emit(info, stderr=payload)
            elif kind == frames.EXIT:
                await link.flush_ack()
                if not isinstance(payload, dict):
                    return 255, 0
                return int(payload.get("code", 255)), int(payload.get("signal", 0))
            elif kind == frames.ERROR:
                await link.flush_ack()
                raise errors.from_wire(payload)
