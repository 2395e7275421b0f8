"""One `rune cp` over CopyService.StreamCopy: the local tree read or written, the remote
side's answers collected per instance. The local side applies the same rules to what it
receives as the agent does (rune/files): a hostile instance cannot write outside DEST.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from rune.cli.client import ApiClient
from rune.cli.cp_progress import CopyProgress
from rune.cli.fanout_output import InstanceResult
from rune.cli.wire import copy_stream

from rune.errors import InvalidArgument, Unavailable, from_wire
from rune.files import grpcwire
from rune.files.entries import CopyLimits
from rune.files.pack import PackRefused, pack_data, unpacked
from rune.files.pump import TreeSink, stream_tree
from rune.files.reader import CHUNK, TreeReader, safepath_reason
from rune.files.safepath import SafeRoot
from rune.files.worker import FileWorker
from rune.files.writer import CopyAborted, TreeWriter
from rune.proto import exec_pb2 as pb
from rune.protowire import COPY_REQUEST_DATA_TAG, encode_bytes_field

Report = Callable[[str], None]


@dataclass
class CopyPlan:
    target: str
    namespace: str
    upload: bool
    sources: list[str]  # local (upload, absolute or "-") or remote (download)
    dest: str  # remote (upload) or local (download, absolute or "-")
    recursive: bool = False
    follow: bool = False
    preserve: bool = False
    chown: str = ""
    timeout: float = 3600.0
    fanout: bool = False
    limits: CopyLimits = field(default_factory=CopyLimits)


@dataclass
class Member:
    result: InstanceResult
    began: float = field(default_factory=time.monotonic)
    failed: int = 0
    done: bool = False
    sink: TreeSink | StdoutSink | None = None


class StdoutSink:
    """DEST `-`: one regular file's bytes to stdout, its digest checked at the end."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.files = 0
        self.errors: list[str] = []

    async def apply(self, kind: str, payload: object) -> None:
        if kind == "pack":
            try:
                for step, part in unpacked(payload):
                    await self.apply(step, part)
            except PackRefused as exc:
                raise CopyAborted(str(exc)) from None
            return
        if kind == "header":
            self.files += 1
            if payload.get("kind") != "file" or self.files > 1:
                raise InvalidArgument("only one regular file can be copied to stdout")
        elif kind == "data":
            view = memoryview(payload)
            while view:
                view = view[os.write(1, view):]
            self.hasher.update(payload)
        elif kind == "end" and not payload.get("error") and \
                payload.get("sha256") != self.hasher.hexdigest():
            self.errors.append("stdout: SHA-256 mismatch: the data was damaged on the way")

    def new_errors(self) -> list[str]:
        fresh, self.errors = self.errors, []
        return fresh

    async def finish(self) -> None:
        return None

    async def abort(self) -> None:
        return None


class CopyCall:
    def __init__(self, client: ApiClient, plan: CopyPlan, report: Report,
                 progress: CopyProgress) -> None:
        self.client = client
        self.plan = plan
        self.report = report
        self.progress = progress
        self.call = copy_stream(client.channel)(metadata=client.metadata)
        self.members: dict[str, Member] = {}
        self.local_failures = 0
        self._sink: TreeSink | StdoutSink | None = None
        self.server_packs = False  # the server takes packed small files (rune/files/pack.py)
        self.worker = FileWorker()
        self.root = SafeRoot.at("/")

    def close(self) -> None:
        self.worker.close()
        self.root.close()

    # --- the stream ---------------------------------------------------------------------
    async def _read(self) -> pb.CopyResponse | None:
        try:
            response = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise self.client.translate(exc, started=bool(self.members)) from None
        return None if response is grpc.aio.EOF else response

    async def _write(self, request: pb.CopyRequest) -> None:
        try:
            await self.call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The call ended: its status is what the reading side reports.
            raise _CallEnded() from None

    async def start(self) -> None:
        p = self.plan
        init = pb.CopyInit(target=p.target, namespace=p.namespace,
                           kind="cp-write" if p.upload else "cp-read",
                           paths=p.sources if not p.upload else [os.path.basename(s.rstrip("/"))
                                                                for s in p.sources],
                           dest=p.dest if p.upload else "", recursive=p.recursive,
                           follow_links=p.follow, preserve=p.preserve, chown=p.chown,
                           timeout_seconds=p.timeout, all=p.fanout,
                           multiple=len(p.sources) > 1, accept_pack=True)
        try:
            await self.call.write(pb.CopyRequest(init=init))
        except asyncio.InvalidStateError:
            pass  # the server already ended the call (a refused token): read says why
        except grpc.aio.AioRpcError as exc:
            raise self.client.translate(exc) from None
        first = await self._read()
        if first is None:
            raise Unavailable("the API server closed the stream before the copy started")
        self.server_packs = first.accept_pack
        if first.WhichOneof("msg") == "error" and not p.fanout:
            raise from_wire({"code": first.error.code, "message": first.error.message})
        if first.WhichOneof("msg") == "plan":
            for i in first.plan.instances:
                self.members[i.instance_id] = Member(InstanceResult(
                    i.instance_id, i.service, i.agent, i.host))
        else:
            await self._handle(first)

    async def _on_started(self, key: str, started: pb.Started) -> None:
        member = self.members.get(key)
        if member is None:
            member = self.members[key] = Member(InstanceResult(started.instance_id))
        r = member.result
        r.service, r.agent, r.host = started.service, started.agent, started.host
        member.began = time.monotonic()
        if not self.plan.upload:
            member.sink = self._sink or await self._local_sink(started.instance_id)

    async def run(self) -> list[InstanceResult]:
        if not self.plan.upload and not self.plan.fanout:
            # The local destination is checked before anything is asked of the server.
            try:
                self._sink = await self._local_sink("")
            except OSError as exc:
                self.local_failures += 1
                self.report(safepath_reason(exc))
                return []
        await self.start()
        replies = asyncio.create_task(self._replies())
        try:
            if self.plan.upload:
                sending = asyncio.create_task(self._send())
                done, _ = await asyncio.wait((sending, replies),
                                             return_when=asyncio.FIRST_COMPLETED)
                if sending in done and not isinstance(sending.exception(), _CallEnded):
                    sending.result()
                else:
                    sending.cancel()
            await replies
        finally:
            replies.cancel()
            for member in self.members.values():
                if member.sink is not None:
                    await member.sink.abort()
        return [m.result for m in self.members.values()]

    # --- upload -------------------------------------------------------------------------
    async def _send(self) -> None:
        p = self.plan

        async def emit(kind: str, payload: object) -> None:
            if kind == "header":
                self.progress.expect(payload.get("size", 0))
                await self._write(pb.CopyRequest(header=grpcwire.header_pb(payload)))
            elif kind == "data":
                # Pre-encoded: one copy, not protobuf's two (rune/protowire.py).
                await self._write(encode_bytes_field(COPY_REQUEST_DATA_TAG, payload))
                self.progress.advance(len(payload))
            elif kind == "end":
                await self._write(pb.CopyRequest(end=grpcwire.end_pb(payload)))
            elif kind == "pack":
                self.progress.expect(sum(e.get("size", 0) for e in payload))
                await self._write(pb.CopyRequest(pack=grpcwire.pack_pb(payload)))
                self.progress.advance(pack_data(payload))
            else:
                self.local_failures += 1
                self.report(f"{payload['path']}: {payload['message']}")

        if p.sources == ["-"]:
            await self._send_stdin(emit)
        else:
            reader = TreeReader(self.root, recursive=p.recursive, follow=p.follow)
            await stream_tree(self.worker, reader, p.sources, emit, pack=self.server_packs)
        await self._write(pb.CopyRequest(done=pb.CopyDone()))
        try:
            await self.call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass

    async def _send_stdin(self, emit: Callable) -> None:
        name = os.path.basename(self.plan.dest.rstrip("/")) or "stdin"
        await emit("header", {"path": name, "kind": "file", "size": -1, "mode": 0o644,
                              "mtime": time.time(), "target": ""})
        hasher, size = hashlib.sha256(), 0
        chunks: asyncio.Queue = asyncio.Queue(4)  # bounded: the reader waits for the link
        loop = asyncio.get_running_loop()
        # A daemon thread of its own: a read blocked on an open stdin must not keep the
        # process from exiting once the copy ended otherwise (timeout, refusal, kill).
        threading.Thread(target=_read_stdin, args=(loop, chunks), daemon=True,
                         name="rune-cp-stdin").start()
        while True:
            data = await chunks.get()
            if isinstance(data, OSError):
                raise data
            if not data:
                break
            hasher.update(data)
            size += len(data)
            await emit("data", data)
        await emit("end", {"size": size, "sha256": hasher.hexdigest()})

    # --- download -----------------------------------------------------------------------
    async def _local_sink(self, instance: str) -> TreeSink | StdoutSink:
        p = self.plan
        if p.dest == "-":
            return StdoutSink()
        dest = p.dest
        if p.fanout:
            dest = os.path.join(p.dest, instance)
            await asyncio.to_thread(os.makedirs, dest, 0o755, True)
        writer = await self.worker.call(TreeWriter, self.root, dest,
                                        len(p.sources) > 1, p.limits,
                                        p.preserve)
        return TreeSink(self.worker, writer)

    async def _replies(self) -> None:
        """Reads until every member is done: file errors, done, errors, download data."""
        while not self.members or not all(m.done for m in self.members.values()):
            response = await self._read()
            if response is None:
                raise Unavailable("the API server ended the copy stream early")
            await self._handle(response)

    async def _handle(self, response: pb.CopyResponse) -> None:
        which = response.WhichOneof("msg")
        key = response.instance_id
        if which == "started":
            await self._on_started(key, response.started)
            return
        member = self.members.get(key)
        if member is None:
            return
        if which in ("header", "data", "end", "pack"):
            await self._download(member, which, response)
        elif which == "file_error":
            member.failed += 1
            e = response.file_error
            self._file_error(member, f"{e.path}: {e.message}" if e.path else e.message)
        elif which == "done":
            await self._finish(member)
        elif which == "error":
            member.done = True
            r = member.result
            r.status = "unreachable" if response.error.code == "unavailable" else "failed"
            r.code, r.error = 255, response.error.message
            r.duration = time.monotonic() - member.began

    async def _download(self, member: Member, which: str, response: pb.CopyResponse) -> None:
        sink = member.sink
        if sink is None:
            return
        if which == "header":
            payload: object = grpcwire.header_dict(response.header)
            self.progress.expect(response.header.size)
        elif which == "data":
            payload = response.data
            self.progress.advance(len(payload))
        elif which == "pack":
            payload = grpcwire.pack_entries(response.pack)
            self.progress.expect(sum(max(e["size"], 0) for e in payload))
            self.progress.advance(pack_data(payload))
        else:
            payload = grpcwire.end_dict(response.end)
        try:
            await sink.apply(which, payload)
        except CopyAborted as exc:
            raise InvalidArgument(f"refused what the instance sent: {exc}") from None
        for failure in sink.new_errors():
            member.failed += 1
            self._file_error(member, str(failure))

    async def _finish(self, member: Member) -> None:
        if member.sink is not None:
            await member.sink.finish()
            for failure in member.sink.new_errors():
                member.failed += 1
                self._file_error(member, str(failure))
            member.sink = None
        member.done = True
        r = member.result
        r.status, r.code = "exited", 1 if member.failed else 0
        r.duration = time.monotonic() - member.began

    def _file_error(self, member: Member, text: str) -> None:
        prefix = f"{member.result.instance_id}: " if self.plan.fanout else ""
        self.report(prefix + text)


class _CallEnded(Exception):
    """Writing failed because the call is over; the reply stream says how it ended."""


def _read_stdin(loop: asyncio.AbstractEventLoop, chunks: asyncio.Queue) -> None:
    """Reads fd 0 into `chunks` until EOF (an empty chunk) or an error (put as is)."""
    while True:
        try:
            data: bytes | OSError = os.read(0, CHUNK)
        except OSError as exc:
            data = exc
        try:
            asyncio.run_coroutine_threadsafe(chunks.put(data), loop).result()
        except (RuntimeError, asyncio.CancelledError):
            return  # the loop is gone: the copy is over
        if not data or isinstance(data, OSError):
            return


def exit_code(results: list[InstanceResult], local_failures: int) -> int:
    if any(r.status != "exited" for r in results):
        return 255
    return 1 if local_failures or any(r.code for r in results) else 0


def absolute(path: str) -> str:
    """A local path made absolute (the local root is `/`), keeping a trailing slash."""
    if path == "-":
        return path
    full = os.path.abspath(path)
    return full + "/" if path.endswith("/") and full != "/" else full


def stderr_report(line: str) -> None:
    sys.stderr.write(f"Error: {line}\n")
