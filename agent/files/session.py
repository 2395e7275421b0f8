"""One copy session on the agent: a tree read from, or written into, an instance.

cp-read sends FILE_HEADER / FILE_DATA / FILE_END per file (FILE_ERROR for what could
not be read; small files whole in FILE_PACK frames when the request allows packs), then
COPY_DONE; cp-write receives the same and answers FILE_ERROR per
file that could not be written, then COPY_DONE with what was written. Either way the
data rides the session's reliable link against credit, so memory stays bounded and a
broker blip is repaired by retransmission. A CLOSE, a lost peer or the timeout ends it;
a file being written then is discarded, never left partial.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from rune.agent.files.roots import InstanceFiles

from rune import frames
from rune.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, RuneError
from rune.files.models import CopyOpen
from rune.files.pack import pack_cost
from rune.files.pump import TreeSink, stream_tree
from rune.files.reader import TreeReader, safepath_reason
from rune.files.worker import FileWorker
from rune.files.writer import CapExceeded, CopyAborted, TreeWriter
from rune.link import SessionLink

log = logging.getLogger(__name__)

COPY_ACCEPTS = frozenset((frames.FILE_HEADER, frames.FILE_DATA, frames.FILE_END,
                          frames.FILE_PACK, frames.COPY_DONE, frames.CLOSE))
_KINDS = {"header": frames.FILE_HEADER, "data": frames.FILE_DATA, "end": frames.FILE_END,
          "error": frames.FILE_ERROR, "pack": frames.FILE_PACK}
_NAMES = {v: k for k, v in _KINDS.items()}


class CopySession:
    def __init__(self, link: SessionLink, request: CopyOpen, files: InstanceFiles,
                 worker: FileWorker,
                 on_done: Callable[[CopySession], Awaitable[None]] | None = None) -> None:
        self.link = link
        self.request = request
        self.files = files
        self.worker = worker
        self.id = request.session_id
        self._on_done = on_done
        self.started = time.monotonic()
        self.result: dict | None = None
        self.failures = 0

    async def run(self) -> None:
        work = asyncio.create_task(self._read() if self.request.kind == "cp-read"
                                   else self._write())
        lost = asyncio.create_task(self.link.lost_event.wait())
        try:
            done, _ = await asyncio.wait((work, lost), timeout=self.request.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                error = work.exception()
            elif lost in done:
                error = self.link.lost
            else:
                error = DeadlineExceeded(f"copy timed out after {self.request.timeout:g}s")
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            if error is not None and self.link.lost is None:
                if not isinstance(error, RuneError):
                    log.exception("copy %s failed", self.id, exc_info=error)
                    error = RuneError(f"agent error: {error}")
                await self.link.send(frames.ERROR, error.to_wire())
            await self._until_consumed()
        finally:
            lost.cancel()
            self.worker.close()
            await asyncio.to_thread(self.files.root.close)
            await self.link.close()
            if self._on_done:
                await self._on_done(self)

    async def _until_consumed(self) -> None:
        deadline = time.monotonic() + self.link.settings.heartbeat * self.link.settings.lost_after
        while not self.link.sender.all_consumed() and self.link.lost is None \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _read(self) -> None:
        """Sends the sources as a tree; watches for a CLOSE from the peer meanwhile."""
        r = self.request
        reader = TreeReader(self.files.root, recursive=r.recursive, follow=r.follow)

        async def emit(kind: str, payload: object) -> None:
            # A pack counts against the credit as the bytes it takes, like data.
            size = len(payload) if kind == "data" else pack_cost(payload) \
                if kind == "pack" else 0
            await self.link.send(_KINDS[kind], payload, size)

        closed = asyncio.create_task(self._closed_by_peer())
        sending = asyncio.create_task(stream_tree(
            self.worker, reader, [self.files.path(p) for p in r.paths], emit, pack=r.pack))
        try:
            done, _ = await asyncio.wait((closed, sending), return_when=asyncio.FIRST_COMPLETED)
            if closed in done:
                raise closed.result()
            manifest, self.failures = sending.result()
        finally:
            closed.cancel()
            sending.cancel()
        self.result = {**manifest.summary(), "failed": self.failures}
        await self.link.send(frames.COPY_DONE, self.result)

    async def _closed_by_peer(self) -> RuneError:
        while True:
            kind, payload = await self.link.recv()
            if kind == frames.CLOSE:
                return RuneError(f"closed by peer: {payload}")

    async def _write(self) -> None:
        r = self.request
        owner = tuple(int(x) for x in r.chown.split(":")) if r.chown else None
        dest = self.files.path(r.dest)
        try:
            writer = await self.worker.call(TreeWriter, self.files.root, dest, r.multiple,
                                            r.limits, r.preserve, owner)
        except OSError as exc:
            # As cp: a destination that cannot be written to is the copy's failure (exit 1).
            self.failures = 1
            await self.link.send(frames.FILE_ERROR, {"path": "",
                                                     "message": _why(exc, r.dest)})
            self.result = {"files": 0, "bytes": 0, "failed": 1}
            await self.link.send(frames.COPY_DONE, self.result)
            return
        sink = TreeSink(self.worker, writer)
        try:
            while True:
                kind, payload = await self.link.recv()
                if kind == frames.CLOSE:
                    raise RuneError(f"closed by peer: {payload}")
                if kind == frames.COPY_DONE:
                    break
                await sink.apply(_NAMES[kind], payload)
                await self._report(sink)
            manifest = await sink.finish()
            await self._report(sink)
        except CapExceeded as exc:
            raise ResourceExhausted(str(exc)) from None
        except CopyAborted as exc:
            raise InvalidArgument(str(exc)) from None
        finally:
            await sink.abort()
        self.result = {**manifest.summary(), "failed": self.failures}
        await self.link.send(frames.COPY_DONE, self.result)

    async def _report(self, sink: TreeSink) -> None:
        for failure in sink.new_errors():
            self.failures += 1
            await self.link.send(frames.FILE_ERROR, {"path": failure.path,
                                                     "message": failure.reason})


def _why(exc: OSError, dest: str) -> str:
    reason = safepath_reason(exc)
    return reason if ": " in reason else f"{dest}: {reason}"
