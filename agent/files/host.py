"""Opens copy sessions for the agent: checks the request, finds the instance's files."""

from __future__ import annotations

import logging

from nats.aio.client import Client as NATS
from rune.agent.files.identity import thread_setup
from rune.agent.files.roots import InstanceFiles, container_files, process_files
from rune.agent.files.session import COPY_ACCEPTS, CopySession

from rune.errors import InvalidArgument, NotFound, NotRunning, ResourceExhausted, RuneError
from rune.files.models import CopyOpen
from rune.files.worker import FileWorker
from rune.link import LinkSettings, SessionLink
from rune.models import ExecOpened, first_problem

log = logging.getLogger(__name__)


def parse_copy(data: dict) -> CopyOpen:
    try:
        return CopyOpen.model_validate(data).check_shape()
    except ValueError as exc:
        raise InvalidArgument(f"malformed copy request: {first_problem(exc)}") from None


class CopyHost:
    def __init__(self, agent: object) -> None:
        self.agent = agent
        self.sessions: dict[str, CopySession] = {}

    async def answer(self, data: dict) -> ExecOpened:
        """The reply to one copy request: opened, or why not (never raises)."""
        try:
            return await self.open(parse_copy(data))
        except RuneError as exc:
            return ExecOpened(ok=False, error=exc.to_wire())
        except OSError as exc:
            return ExecOpened(ok=False, error=RuneError(
                f"cannot reach the instance's files: {exc}").to_wire())
        except Exception as exc:  # whatever happens, the apiserver gets an answer
            log.exception("copy request failed")
            return ExecOpened(ok=False, error=RuneError(f"agent error: {exc}").to_wire())

    async def open(self, request: CopyOpen) -> ExecOpened:
        agent = self.agent
        info = agent.lookup(request.namespace, request.instance_id)
        if info is None:
            raise NotFound(f"instance {request.instance_id} not found on agent "
                           f"{agent.config.agent_id}")
        if info.state != "running":
            raise NotRunning(f"instance {request.instance_id} is {info.state}")
        if len(agent.sessions) + len(self.sessions) >= agent.config.max_sessions:
            raise ResourceExhausted(f"agent {agent.config.agent_id} runs its maximum of "
                                    f"{agent.config.max_sessions} sessions")
        files = await self._files(info)
        try:
            worker = FileWorker(thread_setup(files.identity))
        except OSError:
            files.root.close()
            raise
        nc: NATS = agent.nc
        link = SessionLink(
            nc, send_subject=agent.subjects.session_out(agent.config.agent_id,
                                                        request.session_id),
            recv_subject=agent.subjects.session_in(agent.config.agent_id, request.session_id),
            accepts=COPY_ACCEPTS,
            settings=LinkSettings(window=request.window, heartbeat=request.heartbeat,
                                  lost_after=request.lost_after),
            peer="apiserver")
        await link.open()
        session = CopySession(link, request, files, worker, self._done)
        self.sessions[session.id] = session
        agent._spawn(session.run())
        log.info("copy %s: %s %s in %s", session.id, request.kind,
                 request.paths or request.dest, request.instance_id)
        return ExecOpened(ok=True, host=agent.config.host, packs=True)

    async def _files(self, info: object) -> InstanceFiles:
        if info.runner == "docker":
            return await container_files(self.agent.runners["docker"], info)
        return process_files(self.agent.supervisor.context(info.instance_id), info)

    async def _done(self, session: CopySession) -> None:
        self.sessions.pop(session.id, None)
        log.info("copy %s end: result=%s", session.id,
                 {k: v for k, v in (session.result or {}).items() if k != "sha256"})
