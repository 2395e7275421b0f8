"""The agent: answers session-open requests for the instances it owns, runs the sessions."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from nats.aio.client import Client as NATS
from rune.agent.audit import AgentAudit
from rune.agent.config import AgentConfig
from rune.agent.files.host import CopyHost
from rune.agent.metrics import AgentMetrics
from rune.agent.registry import Registry
from rune.agent.runners.base import CommandUnavailable, Runner
from rune.agent.runners.process import ProcessRunner
from rune.agent.session import ExecSession
from rune.agent.supervisor import Supervisor

from rune import frames
from rune.errors import (
    InvalidArgument,
    NotFound,
    NotRunning,
    ResourceExhausted,
    RuneError,
    Unavailable,
)
from rune.files.models import COPY_KINDS
from rune.link import LinkHub, LinkSettings, SessionLink
from rune.models import (
    EXEC_BATCH,
    MAX_BATCH_OPENS,
    ExecOpen,
    ExecOpened,
    InstanceInfo,
    first_problem,
)
from rune.natsconn import connect
from rune.runtime import settle_heap
from rune.subjects import Subjects

log = logging.getLogger(__name__)

AGENT_ACCEPTS = frozenset((frames.STDIN, frames.STDIN_EOF, frames.RESIZE, frames.SIGNAL,
                           frames.CLOSE))
ALIVE_INTERVAL = 1.0


def _malformed(exc: BaseException) -> ExecOpened:
    return ExecOpened(ok=False, error=InvalidArgument(
        f"malformed exec request: {first_problem(exc)}").to_wire())


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        if not config.host:
            config.host = socket.gethostname()
        self.subjects = Subjects(config.nats.prefix)
        self.nc: NATS | None = None
        self.registry: Registry | None = None
        self.supervisor: Supervisor | None = None
        self.runners: dict[str, Runner] = {}
        self.sessions: dict[str, ExecSession] = {}
        self._tasks: set[asyncio.Task] = set()
        self._stopped = asyncio.Event()
        self.metrics = AgentMetrics(lambda: len(self.sessions))
        self.audit: AgentAudit | None = None
        self.copies = CopyHost(self)
        self.hub: LinkHub | None = None

    async def start(self) -> None:
        # Refuse an unsafe state directory (or an unknown user) before joining the fleet.
        self.supervisor = Supervisor(self.config)
        self.supervisor.open_state()
        self.nc = await connect(self.config.nats.url, f"rune-agent {self.config.agent_id}",
                                self.config.nats.nkey_seed_file, self._on_reconnect,
                                self.subjects.agent_inbox(self.config.agent_id))
        self.audit = AgentAudit(self.nc, self.subjects, self.config.agent_id, self.config.host)
        self.hub = LinkHub(self.nc)  # one subscription and one timer for all sessions
        await self.audit.start()
        self.metrics.watch_publisher("rune_agent_audit_events", self.audit.publisher)
        if self.config.metrics_listen:
            from rune.metrics import serve

            serve(self.config.metrics_listen, self.metrics.registry)
        self.registry = Registry(self.nc, self.subjects)
        await self.registry.open()
        self.supervisor.attach(self.registry)
        self.runners["process"] = ProcessRunner(self.supervisor.context)
        if self.config.docker.enabled:
            from rune.agent.runners.docker import DockerRunner

            docker_runner = DockerRunner(self.config, self.registry,
                                         self.metrics.container_started)
            await docker_runner.start()
            self.runners["docker"] = docker_runner
        await self.nc.subscribe(self.subjects.agent_exec(self.config.agent_id),
                                cb=self._accept_exec)
        # Answering pings lets the apiserver tell "slow" from "gone" (no responders).
        await self.nc.subscribe(self.subjects.agent_ping(self.config.agent_id),
                                cb=self._on_ping)
        self.supervisor.start()
        self._spawn(self._announce_alive())
        settle_heap()
        log.info("agent %s ready on %s", self.config.agent_id, self.config.nats.url)

    async def _on_reconnect(self) -> None:
        if self.registry:
            await self.registry.republish_all()

    def _spawn(self, coro: object) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _announce_alive(self) -> None:
        subject = self.subjects.agent_heartbeat(self.config.agent_id)
        while True:
            try:
                await self.nc.publish(subject, frames.pack({"sessions": len(self.sessions),
                                                            "interval": ALIVE_INTERVAL}))
            except Exception:
                pass
            await asyncio.sleep(ALIVE_INTERVAL)

    async def _on_ping(self, msg: object) -> None:
        try:
            await msg.respond(b"")
        except Exception:
            pass  # no reply subject, or the connection is going: nothing to answer

    def lookup(self, namespace: str, instance_id: str) -> InstanceInfo | None:
        if self.registry is None:
            return None
        return self.registry.current.get(f"{self.config.agent_id}.{namespace}.{instance_id}")

    async def _accept_exec(self, msg: object) -> None:
        # Subscription callbacks run one at a time: open each session in its own task so
        # that one slow spawn does not delay every other session's start.
        self._spawn(self._on_exec(msg))

    async def _on_exec(self, msg: object) -> None:
        # Nothing in a request may raise past here: every way out answers (or logs).
        try:
            data = frames.unpack(msg.data)
        except Exception as exc:  # MalformedFrame: not even msgpack
            await self._reply(msg, _malformed(exc))
            return
        if isinstance(data, dict) and data.get("kind") == EXEC_BATCH:
            await self._respond(msg, {"opened": await self._open_batch(data.get("opens"))})
            return
        await self._reply(msg, await self._answer(data))

    async def _open_batch(self, opens: object) -> list[dict]:
        """A batch open (apiserver/open_batch.py): each open validated and answered on its
        own, all at once, in order; a malformed batch is one refusal per entry it claims."""
        if not isinstance(opens, list) or not 0 < len(opens) <= MAX_BATCH_OPENS:
            refusal = _malformed(ValueError(f"a batch holds 1-{MAX_BATCH_OPENS} opens"))
            return [refusal.model_dump()]
        replies = await asyncio.gather(*(self._answer_packed(o) for o in opens))
        return [r.model_dump() for r in replies]

    async def _answer_packed(self, packed: object) -> ExecOpened:
        try:
            if not isinstance(packed, bytes):
                raise ValueError("a batch entry is not a packed exec request")
            data = frames.unpack(packed)
        except Exception as exc:
            return _malformed(exc)
        return await self._answer(data)

    async def _answer(self, data: object) -> ExecOpened:
        """The reply to one open, exec or copy, alone or in a batch; never raises."""
        if isinstance(data, dict) and data.get("kind") in COPY_KINDS:
            try:
                return await self.copies.answer(data)
            except Exception as exc:
                return _malformed(exc)
        return await self._answer_exec(data)

    async def _answer_exec(self, data: object) -> ExecOpened:
        try:
            request = ExecOpen.model_validate(data)
        except Exception as exc:  # ValidationError, anything a field raises
            return _malformed(exc)
        received = time.monotonic()
        try:
            reply = await self._open(request)
            self.metrics.setup.observe(time.monotonic() - received)
        except RuneError as exc:
            self.metrics.sessions.labels("refused").inc()
            reply = ExecOpened(ok=False, error=exc.to_wire())
        except Exception as exc:  # a runner's unexpected failure must still answer
            log.exception("exec %s failed", request.session_id)
            reply = ExecOpened(ok=False, error=RuneError(f"agent error: {exc}").to_wire())
        return reply

    async def _respond(self, msg: object, reply: dict) -> None:
        try:
            await msg.respond(frames.pack(reply))
        except Exception as exc:
            log.warning("cannot answer exec request: %s", exc)

    async def _reply(self, msg: object, reply: ExecOpened) -> None:
        await self._respond(msg, reply.model_dump())

    async def _open(self, request: ExecOpen) -> ExecOpened:
        info = self.lookup(request.namespace, request.instance_id)
        if info is None:
            raise NotFound(f"instance {request.instance_id} not found on agent "
                           f"{self.config.agent_id}")
        if info.state != "running":
            raise NotRunning(f"instance {request.instance_id} is {info.state}")
        if len(self.sessions) >= self.config.max_sessions:
            raise ResourceExhausted(f"agent {self.config.agent_id} runs its maximum of "
                                    f"{self.config.max_sessions} sessions")
        runner = self.runners.get(info.runner)
        if runner is None:
            raise NotRunning(f"instance {request.instance_id} needs the {info.runner} runner, "
                             "which this agent does not run")
        agent_id = self.config.agent_id
        link = SessionLink(
            self.nc,
            send_subject=self.subjects.session_out(agent_id, request.session_id),
            recv_subject=self.subjects.session_in(agent_id, request.session_id),
            accepts=AGENT_ACCEPTS,
            settings=LinkSettings(window=request.window, heartbeat=request.heartbeat,
                                  lost_after=request.lost_after),
            peer="apiserver",
            hub=self.hub, hub_subject=self.subjects.agent_sessions_in(agent_id),
        )
        await link.open()
        try:
            execution = await runner.exec(info, request)
        except CommandUnavailable as exc:
            self._spawn(self._report_unavailable(link, exc))
            return ExecOpened(ok=True, host=self.config.host, stdin_closed=not request.stdin)
        except BaseException:
            await link.close()
            raise
        if not request.stdin:
            await execution.close_stdin()  # what a STDIN_EOF frame would do, without one
        session = ExecSession(link, execution, request, self.config.exit_grace,
                              self.config.kill_grace, self._session_done)
        self.sessions[session.id] = session
        self._spawn(session.run())
        log.info("session %s: %s in %s (tty=%s)", session.id, request.argv[0],
                 request.instance_id, request.tty)
        return ExecOpened(ok=True, host=self.config.host, pid=getattr(execution, "pid", 0),
                          stdin_closed=not request.stdin)

    async def _report_unavailable(self, link: SessionLink, exc: CommandUnavailable) -> None:
        """A command that cannot start ends like a shell's: message on stderr, 126 or 127."""
        self.metrics.sessions.labels("unavailable").inc()
        try:
            message = f"rune: {exc}\n".encode()
            await link.send(frames.STDERR, message, len(message))
            await link.send(frames.EXIT, {"code": exc.exit_code, "signal": 0})
            while not link.sender.all_consumed() and link.lost is None:
                await asyncio.sleep(0.02)
        finally:
            await link.close()

    async def _session_done(self, session: ExecSession) -> None:
        self.sessions.pop(session.id, None)
        outcome = self.metrics.session_done(session)
        log.info("session %s end: outcome=%s result=%s bytes_out=%d", session.id, outcome,
                 session.result, session.link.bytes_out)
        if session.link.lost is not None and self.audit is not None:
            self.audit.session_lost(session)

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            # Say so rather than fall silent: the client learns at once, not after beats.
            gone = Unavailable(f"agent {self.config.agent_id} is shutting down")
            await session.link.send(frames.ERROR, gone.to_wire())
        for session in list(self.sessions.values()):
            await session.execution.terminate(self.config.kill_grace)
        if self.supervisor:
            await self.supervisor.stop()
        for runner in self.runners.values():
            stop = getattr(runner, "stop", None)
            if stop:
                await stop()
        if self.audit is not None:
            await self.audit.stop()
        for task in list(self._tasks):
            task.cancel()
        if self.hub is not None:
            await self.hub.close()
        if self.nc:
            try:
                await self.nc.drain()
            except Exception:
                pass
