"""The copy session kind: what a copy supplies to the session core (apiserver/session.py).

    open_request  a CopyOpen (cp-read / cp-write, paths, limits) instead of an ExecOpen
    feed          cp-write: the client's entries, frame by frame, onto the link
    relay         the agent's frames to the client: the tree (cp-read), file errors, done

Everything else — limits, registration, kill, idle and session timeouts, audit — is the
core's. With several instances one Broadcast reads the client's stream once and hands
each message to every member (a bounded queue each, so the slowest sets the pace and
memory stays bounded).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from rune.apiserver.session import Session

from rune import errors, frames
from rune.errors import InvalidArgument, ResourceExhausted, Unavailable
from rune.files import grpcwire
from rune.files.models import CopyOpen
from rune.files.pack import (
    MAX_PACK_ENTRIES,
    PackRefused,
    check_pack,
    pack_cost,
    pack_data,
    split_pack,
)
from rune.models import ExecOpened, InstanceInfo
from rune.proto import exec_pb2 as pb
from rune.protowire import COPY_DATA_TAG, encode_bytes_field

COPY_REPLIES = frozenset((frames.FILE_HEADER, frames.FILE_DATA, frames.FILE_END,
                          frames.FILE_PACK, frames.FILE_ERROR, frames.COPY_DONE,
                          frames.ERROR))
QUEUE_DEPTH = 4  # messages (of up to ~1 MiB) waiting per member
_DONE = object()


class Broadcast:
    """The client's cp-write stream, read once, for every member still copying."""

    def __init__(self, context: grpc.aio.ServicerContext, expected: int, max_message: int,
                 max_bytes: int) -> None:
        self.context = context
        self.max_message = max_message
        self.max_bytes = max_bytes
        self._expected = expected
        self._queues: dict[str, asyncio.Queue] = {}
        self._settled = 0
        self._all_settled = asyncio.Event()
        self._task: asyncio.Task | None = None
        if expected == 0:
            self._all_settled.set()

    def join(self, key: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(QUEUE_DEPTH)
        self._queues[key] = queue
        self._settle()
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        return queue

    def leave(self, key: str) -> None:
        """A member that ended (or never started): nothing more is queued for it."""
        queue = self._queues.pop(key, None)
        if queue is None:
            self._settle()
            return
        while not queue.empty():  # a put() blocked on it can finish
            queue.get_nowait()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _settle(self) -> None:
        self._settled += 1
        if self._settled >= self._expected:
            self._all_settled.set()

    async def _run(self) -> None:
        # Members open at their own pace: start reading once each has joined or failed.
        await self._all_settled.wait()
        sent = 0
        try:
            while True:
                request = await self.context.read()
                if request is grpc.aio.EOF:
                    raise InvalidArgument("the client ended the copy before it was done")
                which = request.WhichOneof("msg")
                # ByteSize() serializes the message again: for data its length says it.
                size = len(request.data) if which == "data" else request.ByteSize()
                if size > self.max_message:
                    raise InvalidArgument("message exceeds the maximum message size")
                if which not in ("header", "data", "end", "pack", "done"):
                    raise InvalidArgument(f"unexpected {which or 'empty'} message in a copy")
                if which == "pack":
                    if len(request.pack.entries) > MAX_PACK_ENTRIES:
                        raise InvalidArgument(f"a pack of more than {MAX_PACK_ENTRIES} "
                                              "entries")
                    sent += sum(len(e.data) for e in request.pack.entries)
                if which == "data":
                    sent += len(request.data)
                if which in ("data", "pack") and self.max_bytes and sent > self.max_bytes:
                    raise ResourceExhausted(f"copy exceeds its cap of {self.max_bytes} bytes")
                await self._put(request)
                if which == "done":
                    return
        except (errors.RuneError, grpc.aio.AioRpcError) as exc:
            failure = exc if isinstance(exc, errors.RuneError) else Unavailable(
                f"the client stream broke: {exc.code().name}")
            await self._put(failure)

    async def _put(self, item: object) -> None:
        for queue in list(self._queues.values()):
            await queue.put(item)


class CopyKind:
    """One instance's copy inside the core."""

    accepts = COPY_REPLIES
    # A copy that fails is reported once the agent has discarded what it half wrote.
    settles_on_close = True

    def __init__(self, run: Any, info: InstanceInfo, request: dict[str, Any],
                 window: int) -> None:
        self.run = run
        self.info = info
        self.request = request
        self.name = request["kind"]
        self.window = window
        self.tag = info.instance_id if run.fanout else ""
        self.session: Session | None = None
        self.agent_packs = False  # the agent takes FILE_PACK frames (it says so on open)
        self.done: dict | None = None
        # The copy's audit summary, filled in as it goes (the core puts it on the ended or
        # failed event): a copy that never finishes still says what it asked, what passed.
        self.summary = audit_fields(run.asked, {"outcome": "failed"})

    def open_request(self, session: Session) -> CopyOpen:
        record = session.record
        record.extra = self.summary
        return CopyOpen(session_id=record.id, namespace=self.info.namespace,
                        instance_id=self.info.instance_id, timeout=session.spec.timeout,
                        user=record.user, window=self.window,
                        heartbeat=self.run.config.heartbeat,
                        lost_after=self.run.config.lost_after,
                        pack=self.run.accept_pack, **self.request)

    async def started(self, session: Session, opened: ExecOpened) -> None:
        self.session = session
        self.agent_packs = opened.packs
        record = session.record
        if not self.run.fanout:
            self.run.context.set_trailing_metadata((("rune-session", record.id),))
        await self.run.write(pb.CopyResponse(instance_id=self.tag, started=pb.Started(
            session_id=record.id, instance_id=self.info.instance_id, host=record.host,
            agent=self.info.agent, service=self.info.service, runner=self.info.runner),
            accept_pack=True))

    async def output(self, session: Session, kind: int, data: bytes) -> None:
        return None  # a copy's frames go through relay()

    async def exited(self, session: Session, code: int, signal: int) -> None:
        return None

    async def feed(self, session: Session) -> None:
        if self.name != "cp-write":
            return  # nothing flows from the client in a download
        queue = self.run.broadcast.join(self.info.instance_id)
        link, record = session.link, session.record
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            record.last_io = time.monotonic()
            which = item.WhichOneof("msg")
            if which == "data":
                data = item.data
                for i in range(0, len(data), frames.MAX_DATA):
                    chunk = data[i:i + frames.MAX_DATA]
                    await link.send(frames.FILE_DATA, chunk, len(chunk))
            elif which == "header":
                await link.send(frames.FILE_HEADER, grpcwire.header_dict(item.header))
            elif which == "end":
                self._passed(item.end.size, item.end.error)
                await link.send(frames.FILE_END, grpcwire.end_dict(item.end))
            elif which == "pack":
                await self._feed_pack(link, grpcwire.pack_entries(item.pack))
            else:
                await link.send(frames.COPY_DONE, {})
                return

    async def _feed_pack(self, link: Any, entries: list[dict[str, Any]]) -> None:
        """A client's pack onto the link: re-cut to fit frames, or unpacked for an agent
        that takes no packs."""
        if not self.agent_packs:
            for entry in entries:
                await self._feed_unpacked(link, entry)
            return
        try:
            parts = list(split_pack(entries))
        except PackRefused as exc:
            raise InvalidArgument(str(exc)) from None
        for part in parts:
            for entry in part:
                if entry["kind"] == "file":
                    self._passed(entry["size"], "")
            # Against the credit as the bytes it takes, like data.
            await link.send(frames.FILE_PACK, part, pack_cost(part))

    async def _feed_unpacked(self, link: Any, entry: dict[str, Any]) -> None:
        data = entry.pop("data", b"")
        digest = entry.pop("sha256", "")
        await link.send(frames.FILE_HEADER, entry)
        if entry["kind"] != "file":
            if data:
                raise InvalidArgument("data packed with a directory or symlink")
            return
        for i in range(0, len(data), frames.MAX_DATA):
            chunk = data[i:i + frames.MAX_DATA]
            await link.send(frames.FILE_DATA, chunk, len(chunk))
        self._passed(entry["size"], "")
        await link.send(frames.FILE_END, {"size": entry["size"], "sha256": digest})

    async def relay(self, session: Session) -> None:
        """The agent's frames until its done (or error); done sets the exit and audit."""
        link, record = session.link, session.record
        cap = self.run.config.cp.limits.max_bytes
        received = 0
        while True:
            try:
                kind, payload = await link.recv()
            except Unavailable as exc:
                raise Unavailable(f"{exc}; the copy ended") from None
            record.last_io = time.monotonic()
            if kind == frames.FILE_PACK:
                payload = _agent_pack(payload)
            response = self._response(kind, payload)
            if kind in (frames.FILE_DATA, frames.FILE_PACK):
                received += len(payload) if kind == frames.FILE_DATA else pack_data(payload)
                if cap and received > cap:
                    raise ResourceExhausted(f"copy exceeds its cap of {cap} bytes")
                if kind == frames.FILE_PACK:
                    for entry in payload:
                        if entry.get("kind") == "file":
                            self._passed(entry.get("size"), "")
            elif kind == frames.ERROR:
                await link.flush_ack()
                raise errors.from_wire(payload)
            elif kind == frames.FILE_END and self.name == "cp-read" and \
                    isinstance(payload, dict):
                self._passed(payload.get("size"), payload.get("error"))
            elif kind == frames.COPY_DONE:
                await link.flush_ack()
                self.done = payload if isinstance(payload, dict) else {}
                record.exit_code = 1 if self.done.get("failed") else 0
                self.summary.update(audit_fields(self.run.asked, self.done))
            if response is not None:
                record.writing = True
                try:
                    await self.run.write(response)
                finally:
                    record.writing = False
            if kind == frames.COPY_DONE:
                return

    def _passed(self, size: object, error: object) -> None:
        if isinstance(size, int) and size >= 0 and not error:
            self.summary["files"] += 1
            self.summary["bytes"] += size

    def _response(self, kind: int, payload: Any) -> pb.CopyResponse | bytes | None:
        tag = self.tag
        if kind == frames.FILE_DATA:  # pre-encoded: one copy (apiserver/wire.py)
            return encode_bytes_field(COPY_DATA_TAG, payload, tag)
        if kind == frames.FILE_PACK:
            try:
                return pb.CopyResponse(instance_id=tag, pack=grpcwire.pack_pb(payload))
            except (ValueError, TypeError) as exc:
                raise InvalidArgument(f"refused what the instance sent: a malformed pack "
                                      f"({type(exc).__name__})") from None
        if not isinstance(payload, dict):
            return None
        if kind == frames.FILE_HEADER:
            return pb.CopyResponse(instance_id=tag, header=grpcwire.header_pb(payload))
        if kind == frames.FILE_END:
            return pb.CopyResponse(instance_id=tag, end=grpcwire.end_pb(payload))
        if kind == frames.FILE_ERROR:
            return pb.CopyResponse(instance_id=tag, file_error=pb.FileError(
                path=str(payload.get("path", ""))[:4096],
                message=str(payload.get("message", ""))[:4096]))
        if kind == frames.COPY_DONE:
            return pb.CopyResponse(instance_id=tag, done=grpcwire.done_pb(payload))
        return None


def _agent_pack(payload: object) -> list[dict[str, Any]]:
    """An agent's pack, its shape checked before it goes to the client (which checks
    every entry again as it writes)."""
    try:
        entries = check_pack(payload)
        for entry in entries:
            if not isinstance(entry.get("size", 0), int):
                raise PackRefused("packed entry with a bad size")
        return entries
    except PackRefused as exc:
        raise InvalidArgument(f"refused what the instance sent: {exc}") from None


def asked_fields(kind: str, paths: list[str], dest: str) -> dict[str, Any]:
    """What a copy asked for, as its audit events name it."""
    return {"direction": "upload" if kind == "cp-write" else "download",
            "paths": [p[:4096] for p in paths[:64]], "dest": dest[:4096]}


def audit_fields(asked: dict[str, Any], done: dict[str, Any]) -> dict[str, Any]:
    """The copy's summary on its one ended (or failed) event: direction, paths, files,
    bytes, each file's SHA-256 (the first 1,000), the manifest digest and the outcome."""
    digests = done.get("sha256")
    outcome = done.get("outcome") or ("partial" if done.get("failed") else "success")
    return {**asked,
            "files": int(done.get("files", 0)), "bytes": int(done.get("bytes", 0)),
            "failed_files": int(done.get("failed", 0)),
            "manifest_sha256": str(done.get("manifest_sha256", ""))[:64],
            "sha256": dict(list(digests.items())[:1000]) if isinstance(digests, dict) else {},
            "outcome": outcome}
