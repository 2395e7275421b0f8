"""Starts the configured process services and keeps them running (restart with back-off)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from rune.agent.account import Account
from rune.agent.config import AgentConfig, ProcessService
from rune.agent.environment import instance_environment
from rune.agent.isolation import Isolation, IsolationUnavailable, probe
from rune.agent.registry import Registry
from rune.agent.runners.process import Child, InstanceContext, start_child
from rune.agent.runners.spawn import ChildPlan
from rune.agent.statedir import StateDir, default_state_dir

from rune.models import INSTANCE_MARK, InstanceInfo

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
STABLE_AFTER = 10.0


def instance_id(service: str, agent_id: str, index: int) -> str:
    return f"{service}{INSTANCE_MARK}{agent_id}-{index}"


class SupervisedInstance:
    def __init__(self, config: AgentConfig, service: ProcessService, index: int,
                 registry: Registry | None, account: Account) -> None:
        self.service = service
        self.registry = registry
        self.id = instance_id(service.name, config.agent_id, index)
        self.workdir = service.workdir or ""  # set by start() from the state directory
        env = instance_environment(account, service.env, {
            "RUNE_NAMESPACE": service.namespace, "RUNE_SERVICE": service.name,
            "RUNE_INSTANCE": self.id, "RUNE_AGENT": config.agent_id})
        self.context = InstanceContext(env=env, workdir=self.workdir, account=account)
        self.hide_paths = tuple(service.isolation.hide_paths) if service.isolation else ()
        self.info = InstanceInfo(
            namespace=service.namespace, service=service.name, instance_id=self.id,
            state="starting", agent=config.agent_id, host=config.host, runner="process",
            labels=service.labels,
        )
        self.proc: Child | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def _set_state(self, state: str) -> None:
        self.info = self.info.model_copy(update={"state": state, "updated": time.time()})
        await self.registry.publish(self.info)

    def start(self, state: StateDir) -> None:
        switch = self.context.account.switch
        if self.service.workdir:
            Path(self.workdir).mkdir(parents=True, exist_ok=True)
        else:  # the instance's own directory is its user's
            self.workdir = state.instance_dir(self.id, switch.uid if switch else None,
                                              switch.gid if switch else None)
            self.context.workdir = self.workdir
        if self.hide_paths:  # the instance and every exec see the host the same way
            self.context.isolation = Isolation(self.hide_paths, keep=self.workdir)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stopping:
            started = time.monotonic()
            plan = ChildPlan(argv=list(self.service.command), env=self.context.env,
                             cwd=self.workdir, account=self.context.account.switch,
                             isolation=self.context.isolation)
            try:
                self.proc = await _start_detached(plan)
            except Exception as exc:  # 126/127, a user it cannot become, no fds left …
                log.error("instance %s cannot start: %s", self.id, exc)
                self.proc = None
            if self.proc is not None:
                await self._set_state("running")
                code, _ = await self.proc.wait()
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


async def _start_detached(plan: ChildPlan) -> Child:
    """An instance's process: no stdin, output into the agent's own log streams."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        return await start_child(plan, (null, 1, 2))
    finally:
        os.close(null)


class Supervisor:
    def __init__(self, config: AgentConfig, registry: Registry | None = None) -> None:
        self.config = config
        self.instances: dict[str, SupervisedInstance] = {}
        self.state: StateDir | None = None
        accounts: dict[str | None, Account] = {}
        for service in config.services:
            user = service.user or (config.default_user if os.geteuid() == 0 else None)
            if user not in accounts:
                try:
                    accounts[user] = Account.of(user)
                except KeyError:
                    raise ValueError(f"service {service.name}: no user {user!r} "
                                     "on this host") from None
            runs_as_root = os.geteuid() == 0 and accounts[user].uid == 0
            if runs_as_root and service.replicas:
                log.warning("service %s runs as root (give it a user:, or the agent a "
                            "default_user:, to run it, and every exec into it, "
                            "unprivileged)", service.name)
            if runs_as_root and service.isolation and service.isolation.hide_paths:
                log.warning("service %s runs as root, which can unmount what hide_paths "
                            "covers: the paths are hidden, not out of reach", service.name)
            for index in range(service.replicas):
                inst = SupervisedInstance(config, service, index, registry, accounts[user])
                self.instances[inst.id] = inst
        self._shared = any(a.switch is not None for a in accounts.values())

    def attach(self, registry: Registry) -> None:
        for inst in self.instances.values():
            inst.registry = registry

    def open_state(self) -> None:
        """Opens (or refuses) the state directory, and makes sure every service's paths
        can be hidden; before anything is published."""
        self.check_isolation()
        self.state = StateDir(self.config.state_dir or default_state_dir(), self._shared,
                              self.config.instances_dir)

    def check_isolation(self) -> None:
        """Refuses to run a service whose paths cannot be hidden, rather than expose them."""
        tried: set[tuple[str, ...]] = set()
        for inst in self.instances.values():
            if not inst.hide_paths or inst.hide_paths in tried:
                continue
            tried.add(inst.hide_paths)
            try:
                probe(Isolation(inst.hide_paths))
            except OSError as exc:
                raise IsolationUnavailable(f"service {inst.service.name}: cannot hide its "
                                           f"hide_paths, so it is not started: "
                                           f"{exc.strerror or exc}") from None

    def start(self) -> None:
        if self.state is None:
            self.open_state()
        for inst in self.instances.values():
            inst.start(self.state)

    def context(self, instance_id: str) -> InstanceContext | None:
        inst = self.instances.get(instance_id)
        return inst.context if inst else None

    def info(self, instance_id: str) -> InstanceInfo | None:
        inst = self.instances.get(instance_id)
        return inst.info if inst else None

    async def stop(self) -> None:
        await asyncio.gather(*(inst.stop() for inst in self.instances.values()))
        if self.state is not None:
            self.state.close()
