"""Starts the configured process services and keeps them running (restart with back-off)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from rune.agent.config import AgentConfig, ProcessService
from rune.agent.registry import Registry
from rune.agent.runners.process import InstanceContext, spawn_options, user_ids

from rune.models import INSTANCE_MARK, InstanceInfo

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
STABLE_AFTER = 10.0


def instance_id(service: str, agent_id: str, index: int) -> str:
    return f"{service}{INSTANCE_MARK}{agent_id}-{index}"


class SupervisedInstance:
    def __init__(self, config: AgentConfig, service: ProcessService, index: int,
                 registry: Registry) -> None:
        self.service = service
        self.registry = registry
        self.id = instance_id(service.name, config.agent_id, index)
        self.workdir = service.workdir or str(Path(config.state_dir) / "instances" / self.id)
        env = dict(os.environ)
        env.update(service.env)
        env.update(RUNE_NAMESPACE=service.namespace, RUNE_SERVICE=service.name,
                   RUNE_INSTANCE=self.id, RUNE_AGENT=config.agent_id)
        self.context = InstanceContext(env=env, workdir=self.workdir, user=service.user)
        self.info = InstanceInfo(
            namespace=service.namespace, service=service.name, instance_id=self.id,
            state="starting", agent=config.agent_id, host=config.host, runner="process",
            labels=service.labels,
        )
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def _set_state(self, state: str) -> None:
        self.info = self.info.model_copy(update={"state": state, "updated": time.time()})
        await self.registry.publish(self.info)

    def start(self) -> None:
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        self._ids = user_ids(self.service.user)
        if self._ids and not self.service.workdir:
            os.chown(self.workdir, *self._ids)  # the instance's own directory is its user's
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stopping:
            started = time.monotonic()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.service.command, env=self.context.env,
                    stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
                    **spawn_options(self.workdir, self._ids),
                )
            except OSError as exc:
                log.error("instance %s cannot start: %s", self.id, exc)
                self.proc = None
            if self.proc is not None:
                await self._set_state("running")
                code = await self.proc.wait()
                if self._stopping:
                    break
                log.warning("instance %s exited with %s", self.id, code)
            await self._set_state("exited")
            if time.monotonic() - started > STABLE_AFTER:
                backoff = 0.5
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            if not self._stopping:
                await self._set_state("restarting")

    async def stop(self) -> None:
        self._stopping = True
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, 15)
                await asyncio.wait_for(self.proc.wait(), 5)
            except (ProcessLookupError, TimeoutError):
                try:
                    os.killpg(self.proc.pid, 9)
                except ProcessLookupError:
                    pass
        if self._task:
            self._task.cancel()
        await self._set_state("stopped")


class Supervisor:
    def __init__(self, config: AgentConfig, registry: Registry) -> None:
        self.instances: dict[str, SupervisedInstance] = {}
        for service in config.services:
            for index in range(service.replicas):
                inst = SupervisedInstance(config, service, index, registry)
                self.instances[inst.id] = inst

    def start(self) -> None:
        for inst in self.instances.values():
            inst.start()

    def context(self, instance_id: str) -> InstanceContext | None:
        inst = self.instances.get(instance_id)
        return inst.context if inst else None

    def info(self, instance_id: str) -> InstanceInfo | None:
        inst = self.instances.get(instance_id)
        return inst.info if inst else None

    async def stop(self) -> None:
        await asyncio.gather(*(inst.stop() for inst in self.instances.values()))
