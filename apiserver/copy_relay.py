"""Relays a copy's entries between the CLI's gRPC stream and one or more agents.

cp-write: each message from the client becomes a frame on every instance's link (each
with its own credit: the slowest instance sets the pace, memory stays bounded); the
agents' replies (file errors, done) go back tagged with their instance. cp-read: each
agent's tree goes to the client as it comes, a message per frame, so gRPC's own flow
control and the link's credit hold the data back end to end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from rune.apiserver.config import ApiServerConfig
from rune.apiserver.relay import Relay, SessionRecord

from rune import errors, frames
from rune.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, RuneError, Unavailable
from rune.files import grpcwire
from rune.files.models import CopyOpen
from rune.link import SessionLink
from rune.models import InstanceInfo
from rune.proto import exec_pb2 as pb

log = logging.getLogger(__name__)

COPY_REPLIES = frozenset((frames.FILE_HEADER, frames.FILE_DATA, frames.FILE_END,
                          frames.FILE_ERROR, frames.COPY_DONE, frames.ERROR))


@dataclass
class CopyMember:
    """One instance's copy: its session record, link and how it ended."""

    info: InstanceInfo
    record: SessionRecord
    request: CopyOpen
    link: SessionLink
    began: float
    identity: Any
    opened: bool = False
    done: dict | None = None
    error: RuneError | None = None
    bytes_to_agent: int = 0
    bytes_from_agent: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class CopyRelay:
    def __init__(self, config: ApiServerConfig) -> None:
        self.config = config
        self._write_lock = asyncio.Lock()

    async def open(self, relay: Relay, member: CopyMember, fanout: bool) -> None:
        """Opens the agent's end; in a fan-out a failure is that member's, not the copy's."""
        try:
            await member.link.open()
            opened = await relay.nc.request(
                relay.subjects.agent_exec(member.info.agent),
                frames.pack(member.request.model_dump()), timeout=self.config.open_timeout)
            from rune.models import ExecOpened

            reply = ExecOpened.model_validate(frames.unpack(opened.data))
            if not reply.ok:
                raise errors.from_wire(reply.error)
            member.opened = True
            member.record.host = reply.host or member.info.host
            member.record.opened = time.time()
        except RuneError as exc:
            member.error = exc
        except Exception as exc:  # no responders, timeout, broker gone
            member.error = Unavailable(f"agent {member.info.agent} is not reachable "
                                       f"({type(exc).__name__})")
        if member.error is not None and not fanout:
            raise member.error

    def error_response(self, member: CopyMember, fanout: bool) -> pb.CopyResponse:
        error = member.error or RuneError("copy failed")
        return pb.CopyResponse(instance_id=member.info.instance_id if fanout else "",
                               error=pb.Error(code=error.code, message=error.message))

    async def _write(self, context: grpc.aio.ServicerContext, response: pb.CopyResponse) -> None:
        async with self._write_lock:  # several members answer on one stream
            await context.write(response)

    async def run(self, context: grpc.aio.ServicerContext, init: pb.CopyInit,
                  members: list[CopyMember], fanout: bool) -> None:
        live = [m for m in members if m.error is None]
        if not live:
            return
        timeout = members[0].request.timeout + self.config.heartbeat * 3
        pumps = [asyncio.create_task(self._from_agent(context, m, fanout)) for m in live]
        tasks = list(pumps)
        if init.kind == "cp-write":
            tasks.append(asyncio.create_task(self._to_agents(context, live)))
        kills = [asyncio.ensure_future(m.record.kill.wait()) for m in live]
        try:
            pending = set(tasks)
            deadline = time.monotonic() + timeout
            while pending & set(pumps):
                done, pending = await asyncio.wait(
                    pending | set(kills), timeout=deadline - time.monotonic(),
                    return_when=asyncio.FIRST_COMPLETED)
                pending -= set(kills)
                if not done:
                    raise DeadlineExceeded(f"copy timed out after {timeout:g}s")
                for member, kill in zip(live, kills, strict=True):
                    if kill in done:
                        raise Unavailable(f"session ended: {member.record.kill_reason}")
                for task in done:
                    if task in tasks and task.exception() is not None:
                        raise task.exception()
        finally:
            for task in (*tasks, *kills):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _to_agents(self, context: grpc.aio.ServicerContext,
                         members: list[CopyMember]) -> None:
        """The client's tree, frame by frame, to every live member."""
        cap = self.config.cp.limits.max_bytes
        sent = 0
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                raise InvalidArgument("the client ended the copy before it was done")
            if request.ByteSize() > self.config.max_message:
                raise InvalidArgument("message exceeds the maximum message size")
            which = request.WhichOneof("msg")
            if which == "data":
                data = request.data
                sent += len(data)
                if cap and sent > cap:
                    raise ResourceExhausted(f"copy exceeds its cap of {cap} bytes")
                for i in range(0, len(data), frames.MAX_DATA):
                    chunk = data[i:i + frames.MAX_DATA]
                    await self._send_all(members, frames.FILE_DATA, chunk, len(chunk))
            elif which == "header":
                await self._send_all(members, frames.FILE_HEADER,
                                     grpcwire.header_dict(request.header))
            elif which == "end":
                await self._send_all(members, frames.FILE_END, grpcwire.end_dict(request.end))
            elif which == "done":
                await self._send_all(members, frames.COPY_DONE, {})
                return
            else:
                raise InvalidArgument(f"unexpected {which or 'empty'} message in a copy")

    async def _send_all(self, members: list[CopyMember], kind: int, payload: object,
                        size: int = 0) -> None:
        targets = [m for m in members if m.error is None and m.done is None]
        for member in targets:
            member.bytes_to_agent += size
        if len(targets) == 1:
            await targets[0].link.send(kind, payload, size)
        else:
            await asyncio.gather(*(m.link.send(kind, payload, size) for m in targets))

    async def _from_agent(self, context: grpc.aio.ServicerContext, member: CopyMember,
                          fanout: bool) -> None:
        """One member's frames to the client until its done or error."""
        tag = member.info.instance_id if fanout else ""
        cap = self.config.cp.limits.max_bytes
        while True:
            try:
                kind, payload = await member.link.recv()
            except Unavailable as exc:
                failure = Unavailable(f"{exc}; the copy ended")
                if not fanout:
                    raise failure from None
                member.error = failure
                await self._write(context, self.error_response(member, fanout))
                return
            if kind == frames.FILE_DATA:
                member.bytes_from_agent += len(payload)
                if cap and member.bytes_from_agent > cap:
                    raise ResourceExhausted(f"copy exceeds its cap of {cap} bytes")
                await self._write(context, pb.CopyResponse(instance_id=tag, data=payload))
            elif kind == frames.FILE_HEADER and isinstance(payload, dict):
                await self._write(context, pb.CopyResponse(
                    instance_id=tag, header=grpcwire.header_pb(payload)))
            elif kind == frames.FILE_END and isinstance(payload, dict):
                await self._write(context, pb.CopyResponse(instance_id=tag,
                                                           end=grpcwire.end_pb(payload)))
            elif kind == frames.FILE_ERROR and isinstance(payload, dict):
                await self._write(context, pb.CopyResponse(instance_id=tag, file_error=pb.FileError(
                    path=str(payload.get("path", "")), message=str(payload.get("message", "")))))
            elif kind == frames.COPY_DONE:
                member.done = payload if isinstance(payload, dict) else {}
                await member.link.flush_ack()
                await self._write(context, pb.CopyResponse(
                    instance_id=tag, done=grpcwire.done_pb(member.done)))
                return
            elif kind == frames.ERROR:
                await member.link.flush_ack()
                member.error = errors.from_wire(payload)
                if not fanout:
                    raise member.error
                await self._write(context, self.error_response(member, fanout))
                return

    async def close(self, member: CopyMember) -> None:
        """Tells an agent whose copy did not finish to stop (it discards partial files)."""
        link = member.link
        member.record.bytes_in, member.record.bytes_out = (member.bytes_to_agent,
                                                           member.bytes_from_agent)
        if member.opened and member.done is None and member.error is None:
            try:
                await link.send(frames.CLOSE, "client gone")
                await link.flush_ack()
            except Exception:
                pass
        await link.close()
