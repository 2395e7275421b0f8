"""The one session core: every session kind is limited, registered, opened, relayed, ended here.

    admitted (SessionSpec + instance, see apiserver/admission.py)
      ─▶ acquire limits (per user, per agent)      refused: audited denied
      ─▶ register (sessions list / kill find it)
      ─▶ open the link, then the session on the agent (the one place an ExecOpen is built)
      ─▶ kind.started ─▶ audit started, record TTY / interactive output
      ─▶ relay: agent output ─▶ kind.output; kind.feed ─▶ input and bounded control frames
         until exit, error, kill, idle timeout or the session timeout
      ─▶ on every way out: close the remote end, release, audit ended/failed, unregister

A session kind supplies only what differs (SessionKind): what it does once started, where
output goes, what feeds input. The core owns everything a control depends on. A kind that
runs nothing on an agent (`on_agent = False`: an operator observing a live session) skips
the link and the open; it is limited per user, registered, timed out, audited and killed
like the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from pydantic import BaseModel
from rune.apiserver import observe
from rune.apiserver.admission import SessionSpec
from rune.apiserver.config import ApiServerConfig
from rune.apiserver.directory import InstanceDirectory
from rune.apiserver.limits import SessionLimits
from rune.apiserver.open_batch import OpenBatcher

from rune import audit as schema
from rune import bounds, errors, frames
from rune.errors import DeadlineExceeded, IdleTimeout, InvalidArgument, RuneError, Unavailable
from rune.link import LinkHub, LinkSettings, SessionLink
from rune.models import ExecOpen, ExecOpened, InstanceInfo
from rune.subjects import Subjects

log = logging.getLogger(__name__)

APISERVER_ACCEPTS = frozenset((frames.STDOUT, frames.STDERR, frames.EXIT, frames.ERROR))
# Control frames ride outside the data window: cap their rate so a flood neither grows
# memory here and on the agent nor starves data. Resizes coalesce to the latest size.
RESIZE_INTERVAL = 0.05
SIGNALS_PER_SECOND = 20.0
SIGNAL_BURST = 20
FEED_GRACE = 2.0
CLOSE_GRACE = 5.0  # how long an ended session waits for the agent's last word, at most
_LAST_WORDS = frozenset((frames.ERROR, frames.EXIT, frames.COPY_DONE))
MAX_KILL_REASON = 256


def kill_reason(text: str) -> str:
    """A kill reason as the session's user and the audit will see it: printable, bounded."""
    return "".join(c if c.isprintable() else "?" for c in text.strip())[:MAX_KILL_REASON]


@dataclass
class SessionRecord:
    """What the apiserver knows of a live session (for listing, limits, kill and audit)."""

    id: str
    user: str
    instance: InstanceInfo
    argv: list[str]
    tty: bool
    kind: str = "exec"
    fanout_id: str = ""
    started: float = field(default_factory=time.time)
    exit_code: int | None = None
    signal: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    host: str = ""
    opened: float = 0.0
    tap: Any = None
    kill: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Future | None = None  # while relaying: resolved to end it (kill, idle)
    kill_reason: str = ""
    retransmits: int = 0
    stalls: int = 0
    lost: bool = False
    last_io: float = field(default_factory=time.monotonic)
    writing: bool = False  # output is on its way to a (maybe slow) client: not idle
    extra: dict = field(default_factory=dict)  # what a kind adds to its audit events
    on_agent: bool = True  # False: nothing runs on the agent (an observer); no agent limit
    started_event: str = schema.STARTED  # how its start is audited (observe: observed)
    started_extra: dict = field(default_factory=dict)  # in that event only


class SessionKind(Protocol):
    """What one kind of session (an exec, a fan-out member, …) does differently.

    Optional attributes: `on_agent = False` (nothing opened on the agent; `opened` is
    None), `no_input = True` (stdin is closed once started, by the agent itself where it
    says so; `feed` is not called),
    `started_event` (audit event of its start), `accepts`, `open_request(session)`
    and `relay(session)` (a kind with frames of its own, as a copy)."""

    name: str
    window: int

    async def started(self, session: Session, opened: ExecOpened) -> None:
        """The agent runs the command: tell the client."""

    async def output(self, session: Session, kind: int, data: bytes) -> None:
        """One stdout or stderr chunk from the agent."""

    async def exited(self, session: Session, code: int, signal: int) -> None:
        """The command's exit, after its last output."""

    async def feed(self, session: Session) -> None:
        """Client input until the client half-closes; raises to end the session."""


class Session:
    """One live session's link and its relay, driven by SessionCore.run()."""

    def __init__(self, core: SessionCore, record: SessionRecord, spec: SessionSpec,
                 kind: SessionKind) -> None:
        self.core = core
        self.record = record
        self.spec = spec
        self.kind = kind
        instance = record.instance
        config = core.config
        self.link: SessionLink | None = None if not record.on_agent else SessionLink(
            core.nc,
            send_subject=core.subjects.session_in(instance.agent, record.id),
            recv_subject=core.subjects.session_out(instance.agent, record.id),
            accepts=getattr(kind, "accepts", APISERVER_ACCEPTS),
            settings=LinkSettings(window=kind.window, heartbeat=config.heartbeat,
                                  lost_after=config.lost_after),
            peer=f"agent {instance.agent}",
            probe=lambda: core.agent_gone(instance.agent),
            hub=core.hub, hub_subject=core.subjects.agent_sessions_out(instance.agent),
        )
        self._size: tuple[int, int] | None = None
        self._resizer: asyncio.Task | None = None
        self._last_resize = 0.0
        self._signal_tokens = float(SIGNAL_BURST)
        self._signal_refill = time.monotonic()
        self._stdin_closed = False

    # --- input, called by a kind's feed ------------------------------------------------

    async def stdin(self, data: bytes) -> None:
        if self._stdin_closed:
            raise InvalidArgument("stdin after stdin_close")
        await self._flush_resize()
        self.record.last_io = time.monotonic()
        # Live, as output is counted by the relay: listings and the dashboard read it.
        self.record.bytes_in += len(data)
        if self.record.tap is not None:
            self.record.tap.input(data)
        # Frames stay under the codec's data limit whatever size the client sent.
        for i in range(0, len(data), frames.MAX_DATA):
            chunk = data[i:i + frames.MAX_DATA]
            await self.link.send(frames.STDIN, chunk, len(chunk))

    async def close_stdin(self) -> None:
        if not self._stdin_closed:  # once is all it means; repeats send nothing
            self._stdin_closed = True
            await self._flush_resize()
            await self.link.send(frames.STDIN_EOF)

    def resize(self, width: int, height: int) -> None:
        """Coalesced: a burst of resizes sends at most one frame per RESIZE_INTERVAL."""
        self._size = (bounds.terminal_size(width, "width"),
                      bounds.terminal_size(height, "height"))
        if self._resizer is None or self._resizer.done():
            self._resizer = asyncio.create_task(self._send_resizes())

    async def _send_resizes(self) -> None:
        while self._size is not None:
            wait = self._last_resize + RESIZE_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flush_resize()

    async def _flush_resize(self) -> None:
        """Sends the pending size now: input that follows a resize never overtakes it."""
        if self._size is None:
            return
        (width, height), self._size = self._size, None
        self._last_resize = time.monotonic()
        if self.record.tap is not None:
            self.record.tap.resize(width, height)
        await self.link.send(frames.RESIZE, [width, height])

    async def signal(self, number: int) -> None:
        """Rate-limited: past the burst, the client's stream waits (nothing piles up)."""
        bounds.signal(number)
        await self._flush_resize()
        while True:
            now = time.monotonic()
            self._signal_tokens = min(SIGNAL_BURST, self._signal_tokens
                                      + (now - self._signal_refill) * SIGNALS_PER_SECOND)
            self._signal_refill = now
            if self._signal_tokens >= 1:
                break
            await asyncio.sleep((1 - self._signal_tokens) / SIGNALS_PER_SECOND)
        self._signal_tokens -= 1
        await self.link.send(frames.SIGNAL, number)

    # --- the relay ---------------------------------------------------------------------

    async def live(self) -> None:
        record, core, link = self.record, self.core, self.link
        if link is not None:
            await link.open()
        finished = False
        tasks: list[asyncio.Future] = []
        feed: asyncio.Future | None = None
        try:
            opened = None
            if link is not None:
                # A kind may bring its own open request and pump (a copy: CopyOpen, entries).
                request = self.kind.open_request(self) if hasattr(self.kind, "open_request") \
                    else self._open_request()
                opened = await core.open_on_agent(record.instance, request)
                record.host = opened.host or record.instance.host
            record.last_io = time.monotonic()
            await self.kind.started(self, opened)
            core.oversight.started(record)
            # What ends a relaying session from outside (a kill, the idle sweep) resolves
            # this one future: no watcher task per session (SessionCore.kill, _sweep_idle).
            stop = record.stop = asyncio.get_running_loop().create_future()
            if record.kill.is_set():  # killed while opening
                stop.set_result(None)
            core.watch_idle()
            relay = asyncio.create_task(self.kind.relay(self) if hasattr(self.kind, "relay")
                                        else self._relay_output())
            tasks.append(relay)
            watching: set[asyncio.Future] = {relay, stop}
            if getattr(self.kind, "no_input", False):
                # A kind that forwards nothing needs no feed task; the agent closed stdin
                # itself when it says so (one that predates ExecOpen.stdin does not).
                if opened is not None and not opened.stdin_closed:
                    await self.close_stdin()
            else:
                feed = asyncio.create_task(self.kind.feed(self))
                tasks.append(feed)
                watching.add(feed)
            # The agent enforces the timeout; this backstop covers an agent that never says.
            deadline = time.monotonic() + self.spec.timeout + core.config.heartbeat * 3
            while True:
                done, _ = await asyncio.wait(watching, timeout=deadline - time.monotonic(),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise DeadlineExceeded(f"command timed out after {self.spec.timeout:g}s")
                if stop in done:
                    raise stop.result() or Unavailable(f"session {record.kill_reason}")
                if feed in done:
                    if feed.exception() is not None:
                        raise feed.exception()
                    watching.discard(feed)  # the client half-closed; output goes on
                if relay in done:
                    relay.result()
                    finished = True
                    break
            if feed is not None and not feed.done():
                # The client half-closes once it has the exit; wait for that rather than
                # cancel a pending read, which fails the whole RPC inside grpc.
                await asyncio.wait((feed,), timeout=FEED_GRACE)
        finally:
            record.stop = None
            for task in tasks:
                task.add_done_callback(_retrieve)
                if task is not feed:  # the feed's pending read ends with the RPC
                    task.cancel()
            if self._resizer is not None:
                self._resizer.cancel()
            if link is not None:
                record.bytes_in, record.bytes_out = link.bytes_out, link.bytes_in
                record.retransmits, record.stalls = link.sender.retransmits, link.sender.stalls
                record.lost = link.lost is not None
                if not finished:
                    await asyncio.shield(self._close_remote(
                        [t for t in tasks if t is not feed]))
                await link.close()

    def _open_request(self) -> dict[str, Any]:
        """The ExecOpen as it goes on the wire. What a session shares with the others of
        its request (argv, env, limits: a fan-out's members) is validated once, in
        SessionCore.open_template; what is its own is checked here against the same bounds."""
        record = self.record
        instance = record.instance
        template = self.core.open_template(self.spec, record.user, self.kind.window,
                                           not getattr(self.kind, "no_input", False))
        return {**template, "session_id": bounds.name(record.id, "session id"),
                "namespace": bounds.name(instance.namespace, "namespace"),
                "instance_id": bounds.name(instance.instance_id, "instance id")}

    async def _relay_output(self) -> None:
        record, link = self.record, self.link
        while True:
            try:
                kind, payload = await link.recv()
            except Unavailable as exc:
                raise Unavailable(f"{exc}; the session ended") from None
            if kind in (frames.STDOUT, frames.STDERR):
                # Dashboard hook: live byte count and read-only observers (observe.py).
                observe.tap_output(record, payload)
                if record.tap is not None:  # without a TTY, a shell's prompt is on stderr
                    record.tap.output(payload)
                record.writing = True
                try:
                    await self.kind.output(self, kind, payload)
                finally:
                    record.writing = False
                    record.last_io = time.monotonic()
            elif kind == frames.EXIT:
                code = int(payload.get("code", 255)) if isinstance(payload, dict) else 255
                sig = int(payload.get("signal", 0)) if isinstance(payload, dict) else 0
                record.exit_code, record.signal = code, sig
                await link.flush_ack()
                await self.kind.exited(self, code, sig)
                return
            elif kind == frames.ERROR:
                await link.flush_ack()
                raise errors.from_wire(payload)

    async def _close_remote(self, readers: list[asyncio.Future]) -> None:
        try:
            await self.link.send(frames.CLOSE, "client gone")
            await self.link.flush_ack()
            if getattr(self.kind, "settles_on_close", False):
                # The client hears of the failure only once the agent has undone its part
                # (a copy's half-written files): read on, after the kind's own readers.
                if readers:
                    await asyncio.wait(readers, timeout=CLOSE_GRACE)
                await asyncio.wait_for(self._until_remote_ended(), CLOSE_GRACE)
        except Exception:
            pass

    async def _until_remote_ended(self) -> None:
        while (await self.link.recv())[0] not in _LAST_WORDS:
            pass
        await self.link.flush_ack()


class SessionCore:
    """Owns the live sessions of this apiserver and runs each one through the same steps."""

    def __init__(self, nc: NATS, subjects: Subjects, config: ApiServerConfig,
                 directory: InstanceDirectory, limits: SessionLimits, oversight: Any) -> None:
        self.nc = nc
        self.subjects = subjects
        self.config = config
        self.directory = directory
        self.limits = limits
        self.oversight = oversight
        self.sessions: dict[str, SessionRecord] = {}
        self.board: Any = None  # apiserver/peers.py SessionBoard, when sessions are shared
        self.opener = OpenBatcher(nc, subjects, config.open_timeout)
        self.hub = LinkHub(nc)  # one subscription per agent, one timer, for every session
        self._idle_sweep: asyncio.Task | None = None
        self._open_template: tuple[tuple, dict[str, Any]] | None = None

    async def run(self, identity: Any, spec: SessionSpec, instance: InstanceInfo,
                  kind: SessionKind, fanout_id: str = "",
                  received: float | None = None) -> SessionRecord:
        """Lives one session to its end; returns its record (exit code filled when it exited).
        Raises the RuneError that ended it otherwise; every step is released on the way."""
        on_agent = getattr(kind, "on_agent", True)
        agent = instance.agent if on_agent else ""  # an observer loads no agent
        try:
            self.limits.acquire(identity.user, agent)
        except RuneError as exc:
            self.oversight.denied(identity, spec, exc, fanout_id=fanout_id)
            raise
        record = SessionRecord(id=uuid.uuid4().hex, user=identity.user, instance=instance,
                               argv=list(spec.argv), tty=spec.tty, kind=kind.name,
                               fanout_id=fanout_id, on_agent=on_agent,
                               started_event=getattr(kind, "started_event", schema.STARTED))
        self.sessions[record.id] = record
        if self.board is not None:
            self.board.added(record)
        if on_agent:
            self.directory.busy[instance.key] += 1
        self.oversight.opening(record, identity, spec,
                               received if received is not None else time.monotonic())
        outcome: BaseException | None = None
        try:
            await Session(self, record, spec, kind).live()
        except BaseException as exc:
            outcome = exc
            raise
        finally:
            self.limits.release(identity.user, agent)
            if on_agent:
                self.directory.busy[instance.key] -= 1
            self.sessions.pop(record.id, None)
            if self.board is not None:
                self.board.removed(record)
            self.oversight.ended(record, outcome)
        return record

    def open_template(self, spec: SessionSpec, user: str, window: int,
                      stdin: bool) -> dict[str, Any]:
        """An ExecOpen validated once for every session of one request, as a map without
        the fields each session fills in (session_id, namespace, instance_id)."""
        key = (spec, user, window, stdin)
        last = self._open_template
        if last is not None and last[0][0] is spec and last[0][1:] == key[1:]:
            return last[1]
        env = dict(spec.env)
        if spec.tty and spec.term:
            env.setdefault("TERM", spec.term)
        config = self.config
        template = ExecOpen(
            session_id="x", namespace="x", instance_id="x", argv=list(spec.argv), env=env,
            workdir=spec.workdir, tty=spec.tty, width=spec.width or 80,
            height=spec.height or 24, timeout=spec.timeout, window=window, user=user,
            heartbeat=config.heartbeat, lost_after=config.lost_after,
            stdin=stdin).model_dump()
        for own in ("session_id", "namespace", "instance_id"):
            del template[own]
        self._open_template = (key, template)
        return template

    async def open_on_agent(self, instance: InstanceInfo,
                            request: BaseModel | dict[str, Any]) -> ExecOpened:
        """Asks the owning agent to start the session; Unavailable when it does not answer."""
        # Opens waiting for the same agent leave together, one request (open_batch.py).
        fields = request if isinstance(request, dict) else request.model_dump()
        answer = await self.opener.open(instance.agent, frames.pack(fields))
        try:
            opened = ExecOpened.model_validate(answer)
        except ValueError as exc:
            raise Unavailable(f"agent {instance.agent} answered nonsense: {exc}") from None
        if not opened.ok:
            raise errors.from_wire(opened.error)
        return opened

    async def agent_gone(self, agent: str) -> bool:
        """True only when the broker says nobody serves the agent's subjects any more."""
        try:
            await self.nc.request(self.subjects.agent_ping(agent), b"",
                                  timeout=self.config.heartbeat)
        except NoRespondersError:
            return True
        except Exception:
            return False
        return False

    def kill(self, session_id: str, operator: Any, why: str) -> bool:
        """Ends one live session of this apiserver, audited as killed by `operator` (an
        Identity) with `why`, whichever apiserver the operator asked. Its user reads
        `session ended by <operator>: <why>`."""
        record = self.sessions.get(session_id)
        if record is None:
            return False
        if record.kill.is_set():
            return True  # one kill, one event
        why = kill_reason(why)
        self.operator_event(schema.KILLED, operator, record, reason=why)
        record.kill_reason = f"ended by {operator.user}" + (f": {why}" if why else "")
        record.kill.set()
        if record.stop is not None and not record.stop.done():
            record.stop.set_result(None)
        return True

    def watch_idle(self) -> None:
        """Starts the one idle sweep of this apiserver's sessions (when an idle timeout is
        set and it is not running yet)."""
        if self.config.idle_timeout > 0 and (self._idle_sweep is None
                                             or self._idle_sweep.done()):
            self._idle_sweep = asyncio.create_task(self._sweep_idle())

    async def _sweep_idle(self) -> None:
        """Ends every relaying session with no byte either way for the idle timeout; runs
        while there are sessions (one task for all, not one per session)."""
        limit = self.config.idle_timeout
        while self.sessions:
            now = time.monotonic()
            wait = min(limit, 1.0)
            for record in list(self.sessions.values()):
                if record.stop is None or record.stop.done():
                    continue
                quiet = 0.0 if record.writing else now - record.last_io
                if quiet >= limit:
                    log.info("session %s: idle for %.1fs; ending it", record.id, quiet)
                    record.stop.set_result(IdleTimeout(
                        f"session idle: no input or output for {limit:g}s (the server's "
                        "idle timeout); the remote command was stopped"))
                else:
                    wait = min(wait, limit - quiet)
            await asyncio.sleep(wait + 0.01)

    def operator_event(self, event: str, operator: Any, record: SessionRecord,
                       **extra: Any) -> None:
        """An operator acted on someone's live session: who, on which session, why."""
        i = record.instance
        fields = {"user": operator.user, "groups": list(operator.groups),
                  "namespace": i.namespace, "target": i.instance_id, "argv": list(record.argv),
                  "tty": record.tty, "session_id": record.id, "session_user": record.user,
                  "instance": i.instance_id, "service": i.service, "agent": i.agent,
                  "host": record.host or i.host, "kind": record.kind, **extra}
        if record.fanout_id:
            fields["fanout_id"] = record.fanout_id
        self.oversight.operator(schema.make_event(event, **fields))


def _retrieve(task: asyncio.Future) -> None:
    """A read left pending when the RPC ends fails with 'RPC already finished': expected."""
    if not task.cancelled():
        task.exception()

