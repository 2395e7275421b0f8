"""Relays one exec session between a CLI's gRPC stream and the owning agent over NATS."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from rune.apiserver import observe
from rune.apiserver.config import ApiServerConfig

from rune import errors, frames
from rune.errors import DeadlineExceeded, IdleTimeout, InvalidArgument, Unavailable
from rune.link import LinkSettings, SessionLink
from rune.models import ExecOpen, ExecOpened, InstanceInfo
from rune.proto import exec_pb2 as pb
from rune.subjects import Subjects

log = logging.getLogger(__name__)

APISERVER_ACCEPTS = frozenset((frames.STDOUT, frames.STDERR, frames.EXIT, frames.ERROR))


@dataclass
class SessionRecord:
    """What the apiserver knows of a live session (for listing, limits and audit)."""

    id: str
    user: str
    instance: InstanceInfo
    argv: list[str]
    tty: bool
    started: float = field(default_factory=time.time)
    exit_code: int | None = None
    signal: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    # Filled for operators (apiserver/oversight.py): where it ran, recorder, kill switch, stats.
    host: str = ""
    opened: float = 0.0
    tap: Any = None
    kill: asyncio.Event = field(default_factory=asyncio.Event)
    kill_reason: str = ""
    retransmits: int = 0
    stalls: int = 0
    lost: bool = False
    last_io: float = field(default_factory=time.monotonic)
    writing: bool = False  # output is on its way to a (maybe slow) client: not idle


class Relay:
    def __init__(self, nc: NATS, subjects: Subjects, config: ApiServerConfig) -> None:
        self.nc = nc
        self.subjects = subjects
        self.config = config
        self.on_started: Callable[[SessionRecord], None] | None = None

    def new_session_id(self) -> str:
        return uuid.uuid4().hex

    async def run(self, context: grpc.aio.ServicerContext, init: pb.ExecInit,
                  instance: InstanceInfo, record: SessionRecord) -> None:
        timeout = init.timeout_seconds or 300.0
        timeout = min(timeout, self.config.max_timeout)
        request = ExecOpen(
            session_id=record.id, namespace=instance.namespace,
            instance_id=instance.instance_id, argv=list(init.command), env=dict(init.env),
            workdir=init.workdir, tty=init.tty, width=init.width or 80,
            height=init.height or 24, timeout=timeout, window=self.config.window, user=record.user,
            heartbeat=self.config.heartbeat, lost_after=self.config.lost_after,
        )
        if init.tty and init.term:
            request.env.setdefault("TERM", init.term)
        link = SessionLink(
            self.nc,
            send_subject=self.subjects.session_in(instance.agent, record.id),
            recv_subject=self.subjects.session_out(instance.agent, record.id),
            accepts=APISERVER_ACCEPTS,
            settings=LinkSettings(window=self.config.window, heartbeat=self.config.heartbeat,
                                  lost_after=self.config.lost_after),
            peer=f"agent {instance.agent}",
            probe=lambda: self._agent_gone(instance.agent),
        )
        await link.open()
        finished = False
        try:
            opened = await self._open(instance, request)
            # Every status the server ends this stream with carries the session id: how
            # the client tells the server's verdict from a broken connection.
            context.set_trailing_metadata((("rune-session", record.id),))
            await context.write(pb.ExecResponse(started=pb.Started(
                session_id=record.id, instance_id=instance.instance_id,
                host=opened.host or instance.host, agent=instance.agent,
                service=instance.service, runner=instance.runner)))
            record.host = opened.host or instance.host
            record.last_io = time.monotonic()
            if self.on_started:
                self.on_started(record)
            upstream = asyncio.create_task(self._client_to_agent(context, link, record))
            downstream = asyncio.create_task(self._agent_to_client(context, link, record))
            killed = asyncio.ensure_future(record.kill.wait())
            idle = asyncio.create_task(self._idle_watch(record))
            try:
                # The agent enforces the timeout; this backstop covers an agent that never says.
                done, _ = await asyncio.wait(
                    (upstream, downstream, killed, idle),
                    timeout=timeout + self.config.heartbeat * 3,
                    return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise DeadlineExceeded(f"command timed out after {timeout:g}s")
                if killed in done:
                    raise Unavailable(f"session {record.kill_reason}")
                if idle in done:
                    raise idle.exception()
                if upstream in done and upstream.exception() is not None:
                    raise upstream.exception()
                await downstream
                finished = True
                # The client half-closes once it has the exit; wait for that rather than
                # cancel a pending read, which fails the whole RPC inside grpc.
                await asyncio.wait((upstream,), timeout=2.0)
            finally:
                upstream.add_done_callback(_retrieve)
                downstream.cancel()
                killed.cancel()
                idle.cancel()
        finally:
            record.bytes_in, record.bytes_out = link.bytes_out, link.bytes_in
            record.retransmits, record.stalls = link.sender.retransmits, link.sender.stalls
            record.lost = link.lost is not None
            if not finished:
                await asyncio.shield(self._close_remote(link))
            await link.close()

    def session_link(self, instance: InstanceInfo, session_id: str,
                     window: int | None = None) -> SessionLink:
        """The apiserver end of one session (fan-out opens one per instance)."""
        window = window or self.config.window
        return SessionLink(
            self.nc,
            send_subject=self.subjects.session_in(instance.agent, session_id),
            recv_subject=self.subjects.session_out(instance.agent, session_id),
            accepts=APISERVER_ACCEPTS,
            settings=LinkSettings(window=window, heartbeat=self.config.heartbeat,
                                  lost_after=self.config.lost_after),
            peer=f"agent {instance.agent}",
        )

    async def open_session(self, instance: InstanceInfo, request: ExecOpen) -> ExecOpened:
        """Asks the owning agent to start the session; Unavailable when it does not answer."""
        return await self._open(instance, request)

    async def close_remote(self, link: SessionLink) -> None:
        await self._close_remote(link)

    async def _open(self, instance: InstanceInfo, request: ExecOpen) -> ExecOpened:
        try:
            reply = await self.nc.request(
                self.subjects.agent_exec(instance.agent), frames.pack(request.model_dump()),
                timeout=self.config.open_timeout)
        except (NoRespondersError, NatsTimeout):
            raise Unavailable(f"agent {instance.agent} is not reachable") from None
        except Exception as exc:
            raise Unavailable(f"broker unavailable: {exc}") from None
        opened = ExecOpened.model_validate(frames.unpack(reply.data))
        if not opened.ok:
            raise errors.from_wire(opened.error)
        return opened

    async def _idle_watch(self, record: SessionRecord) -> None:
        """Raises IdleTimeout once no byte moved either way for the server's idle timeout."""
        limit = self.config.idle_timeout
        if limit <= 0:
            await asyncio.Event().wait()  # off: never fires
        while True:
            quiet = time.monotonic() - record.last_io
            if record.writing:
                quiet = 0.0
            if quiet >= limit:
                log.info("session %s: idle for %.1fs; ending it", record.id, quiet)
                raise IdleTimeout(f"session idle: no input or output for {limit:g}s (the "
                                  "server's idle timeout); the remote command was stopped")
            await asyncio.sleep(min(limit - quiet, 1.0) + 0.01)

    async def _agent_gone(self, agent: str) -> bool:
        """True only when the broker says nobody serves the agent's subjects any more."""
        try:
            await self.nc.request(self.subjects.agent_ping(agent), b"",
                                  timeout=self.config.heartbeat)
        except NoRespondersError:
            return True
        except Exception:
            return False
        return False

    async def _close_remote(self, link: SessionLink) -> None:
        try:
            await link.send(frames.CLOSE, "client gone")
            await link.flush_ack()
        except Exception:
            pass

    async def _client_to_agent(self, context: grpc.aio.ServicerContext,
                               link: SessionLink, record: SessionRecord) -> None:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            kind = request.WhichOneof("msg")
            if request.ByteSize() > self.config.max_message:
                raise InvalidArgument("message exceeds the maximum message size")
            if kind == "stdin":
                data = request.stdin
                record.last_io = time.monotonic()
                if record.tap is not None:
                    record.tap.input(data)
                # Frames stay under the codec's data limit whatever size the client sent.
                for i in range(0, len(data), frames.MAX_DATA):
                    chunk = data[i:i + frames.MAX_DATA]
                    await link.send(frames.STDIN, chunk, len(chunk))
            elif kind == "stdin_close":
                await link.send(frames.STDIN_EOF)
            elif kind == "resize":
                if record.tap is not None:
                    record.tap.resize(request.resize.width, request.resize.height)
                await link.send(frames.RESIZE, [request.resize.width, request.resize.height])
            elif kind == "signal":
                await link.send(frames.SIGNAL, request.signal.number)
            else:
                raise InvalidArgument(f"unexpected {kind or 'empty'} message after init")

    async def _agent_to_client(self, context: grpc.aio.ServicerContext, link: SessionLink,
                               record: SessionRecord) -> None:
        while True:
            try:
                kind, payload = await link.recv()
            except Unavailable as exc:
                raise Unavailable(f"{exc}; the session ended") from None
            if kind in (frames.STDOUT, frames.STDERR):
                # Dashboard hook: live byte count and read-only observers (observe.py).
                observe.tap_output(record, payload)
                if kind == frames.STDOUT and record.tap is not None:
                    record.tap.output(payload)
                record.writing = True
                try:
                    await context.write(pb.ExecResponse(stdout=payload) if kind == frames.STDOUT
                                        else pb.ExecResponse(stderr=payload))
                finally:
                    record.writing = False
                    record.last_io = time.monotonic()
            elif kind == frames.EXIT:
                code = int(payload.get("code", 255)) if isinstance(payload, dict) else 255
                sig = int(payload.get("signal", 0)) if isinstance(payload, dict) else 0
                record.exit_code, record.signal = code, sig
                await link.flush_ack()
                await context.write(pb.ExecResponse(exit=pb.Exit(code=code, signal=sig)))
                return
            elif kind == frames.ERROR:
                await link.flush_ack()
                raise errors.from_wire(payload)


def _retrieve(task: asyncio.Task) -> None:
    """A read left pending when the RPC ends fails with 'RPC already finished': expected."""
    if not task.cancelled():
        task.exception()
