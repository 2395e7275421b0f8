"""The apiserver's live view of every instance, watched from the registry KV bucket.

Agents also beat on `rune.out.<agent>._alive`; an agent silent for `lost_after`
of its beat intervals is lost, and its instances show (and resolve) as "lost"
whatever the bucket last said, until it beats again.

An agent's credential speaks only for itself: the broker lets it write only its own
keys, and this directory believes an entry only within the namespaces the config binds
that agent to (`agents: {h1: {namespaces: [default]}}`; unlisted agents: any); others are
ignored and logged once. An instance id in a namespace claimed by two agents shows as
"conflict" for both and resolves for neither, until one of the entries goes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence

from nats.aio.client import Client as NATS
from pydantic import ValidationError

from rune import frames
from rune.errors import NotFound, NotRunning
from rune.models import INSTANCE_MARK, InstanceInfo
from rune.registry import open_instances_bucket
from rune.subjects import Subjects

log = logging.getLogger(__name__)

DEFAULT_BEAT = 1.0  # assumed for an agent not heard yet
LIVENESS_TICK = 0.1


class InstanceDirectory:
    def __init__(self, nc: NATS, subjects: Subjects, lost_after: int = 3,
                 agent_namespaces: Mapping[str, Sequence[str]] | None = None) -> None:
        self._nc = nc
        self._subjects = subjects
        self.lost_after = lost_after
        # The believed entries, conflicts marked: what listing, resolving and fan-out see.
        self.instances: dict[str, InstanceInfo] = {}
        self._claimed: dict[str, InstanceInfo] = {}  # believed entries as the agents wrote
        self._claims: dict[tuple[str, str], set[str]] = {}  # (namespace, id) -> keys
        self._bound = {agent: frozenset(ns) for agent, ns in (agent_namespaces or {}).items()}
        self._ignored: set[str] = set()  # keys already logged as outside their agent's bind
        self.busy: Counter[str] = Counter()
        self._kv = None
        self._follower: asyncio.Task | None = None
        self._liveness: asyncio.Task | None = None
        self.ready = asyncio.Event()
        self._beats: dict[str, tuple[float, float]] = {}  # agent -> (last beat, interval)
        self._since = time.monotonic()  # silence before this instant is not held against anyone
        self.lost_agents: set[str] = set()
        # The agents of the believed entries, rebuilt only after a change: every tick
        # walking thousands of entries cost a fan-out more the bigger the fleet.
        self._agents: set[str] | None = None

    async def start(self) -> None:
        self._kv = await open_instances_bucket(self._nc, self._subjects)
        await self._nc.subscribe(self._subjects.all_agent_heartbeats(), cb=self._on_beat)
        self._since = time.monotonic()
        self._follower = asyncio.create_task(self._follow())
        self._liveness = asyncio.create_task(self._watch_liveness())
        await self.ready.wait()

    async def stop(self) -> None:
        for task in (self._follower, self._liveness):
            if task:
                task.cancel()

    async def _on_beat(self, msg: object) -> None:
        agent = self._subjects.heartbeat_agent(msg.subject)
        if agent is None:
            return
        interval = DEFAULT_BEAT
        try:
            beat = frames.unpack(msg.data)
            if isinstance(beat, dict) and isinstance(beat.get("interval"), (int, float)):
                interval = min(max(float(beat["interval"]), 0.05), 60.0)
        except frames.MalformedFrame:
            pass  # a beat is a beat: only its interval is optional
        self._beats[agent] = (time.monotonic(), interval)
        if agent in self.lost_agents:
            self.lost_agents.discard(agent)
            log.info("agent %s is back", agent)

    def _silent_too_long(self, agent: str, now: float) -> bool:
        last, interval = self._beats.get(agent, (self._since, DEFAULT_BEAT))
        return now - max(last, self._since) > interval * self.lost_after

    async def _watch_liveness(self) -> None:
        disconnected = False
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(LIVENESS_TICK)
            now = time.monotonic()
            if now - last_tick > 1.0:
                self._since = now  # we were starved: unread beats may be waiting
            last_tick = now
            if not self._nc.is_connected:
                # We hear nobody while our own connection is down: that is not their fault.
                self._since = now
                disconnected = True
                continue
            if disconnected:
                disconnected = False
                self._rewatch()
            if self._agents is None:  # the entries changed since the last tick
                self._agents = {i.agent for i in self.instances.values()}
            for agent in (self._agents | self._beats.keys()) - self.lost_agents:
                if self._silent_too_long(agent, now):
                    self.lost_agents.add(agent)
                    log.warning("agent %s lost: no liveness beat for %d intervals; its "
                                "instances are now lost", agent, self.lost_after)

    def effective(self, info: InstanceInfo) -> InstanceInfo:
        """The entry as users see it: a lost agent's instances are lost, not running."""
        if info.agent in self.lost_agents and info.state not in ("lost", "conflict"):
            return info.model_copy(update={"state": "lost"})
        return info

    async def _follow(self) -> None:
        """Applies bucket updates; watches again when the watch fails."""
        while True:
            try:
                await self._apply(await self._kv.watchall())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("registry watch failed (%s); watching again", exc)
            await asyncio.sleep(0.5)

    def _rewatch(self) -> None:
        """A broker restart may take the watch's consumer with it: start a fresh watch."""
        if self._follower:
            self._follower.cancel()
        self._follower = asyncio.create_task(self._follow())

    async def _apply(self, watcher: object) -> None:
        async for entry in watcher:
            if entry is None:  # the watcher's "caught up" marker
                self.ready.set()
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self.forget(entry.key)
                continue
            try:
                info = InstanceInfo.model_validate_json(entry.value)
            except ValidationError as exc:
                log.warning("ignoring malformed registry entry %s: %s", entry.key, exc)
                continue
            if info.key != entry.key:  # an agent may write only its own keys: believe no other
                log.warning("ignoring registry entry %s that claims agent %s", entry.key,
                            info.agent)
                continue
            self.accept(info)

    def bound_to(self, info: InstanceInfo) -> bool:
        namespaces = self._bound.get(info.agent)
        return namespaces is None or "*" in namespaces or info.namespace in namespaces

    def accept(self, info: InstanceInfo) -> None:
        """Takes one agent-written entry (already checked to be under its own key)."""
        if not self.bound_to(info):
            if info.key not in self._ignored:
                self._ignored.add(info.key)
                log.warning("ignoring registry entry %s: agent %s is not bound to namespace "
                            "%s", info.key, info.agent, info.namespace)
            self.forget(info.key)
            return
        self._claimed[info.key] = info
        self._claims.setdefault((info.namespace, info.instance_id), set()).add(info.key)
        self._settle(info.namespace, info.instance_id)

    def forget(self, key: str) -> None:
        self._agents = None
        gone = self._claimed.pop(key, None)
        self.instances.pop(key, None)
        if gone is not None:
            keys = self._claims.get((gone.namespace, gone.instance_id), set())
            keys.discard(key)
            if not keys:
                self._claims.pop((gone.namespace, gone.instance_id), None)
            self._settle(gone.namespace, gone.instance_id)

    def _settle(self, namespace: str, instance_id: str) -> None:
        """Marks every claim of (namespace, instance id) "conflict" while agents disagree."""
        self._agents = None
        claims = [self._claimed[k] for k in self._claims.get((namespace, instance_id), ())]
        agents = {i.agent for i in claims}
        for claim in claims:
            if len(agents) > 1:
                if claim.key not in self.instances or self.instances[claim.key].state != \
                        "conflict":
                    log.warning("instance %s in namespace %s is claimed by agents %s: "
                                "refused until one claim goes", instance_id, namespace,
                                ", ".join(sorted(agents)))
                self.instances[claim.key] = claim.model_copy(update={"state": "conflict"})
            else:
                self.instances[claim.key] = claim

    def list(self, namespace: str | None = None) -> list[InstanceInfo]:
        items = [self.effective(i) for i in self.instances.values()
                 if namespace is None or i.namespace == namespace]
        return sorted(items, key=lambda i: (i.namespace, i.service, i.instance_id))

    def resolve(self, namespace: str, target: str) -> InstanceInfo:
        """A service name → its least busy running instance; an instance id → that one."""
        if INSTANCE_MARK in target:
            info = next((i for i in self.instances.values()
                         if i.namespace == namespace and i.instance_id == target), None)
            info = self.effective(info) if info is not None else None
            if info is None:
                raise NotFound(f'instance not found: no instance "{target}" in namespace '
                               f'"{namespace}"')
            if info.state == "conflict":
                raise NotRunning(f'instance not running: "{target}" is claimed by more than '
                                 f"one agent ({self._claimants(namespace, target)}); refused "
                                 "until one claim goes")
            if info.state != "running":
                why = f" (agent {info.agent} lost)" if info.agent in self.lost_agents else ""
                raise NotRunning(f'instance not running: "{target}" is {info.state}{why}')
            return info
        candidates = [self.effective(i) for i in self.instances.values()
                      if i.namespace == namespace and i.service == target]
        if not candidates:
            raise NotFound(f'instance not found: no service or instance "{target}" in '
                           f'namespace "{namespace}"')
        running = [i for i in candidates if i.state == "running"]
        if not running:
            states = ", ".join(sorted({i.state for i in candidates}))
            raise NotRunning(f'instance not running: service "{target}" has no running '
                             f'instance ({states})')
        return min(running, key=lambda i: (self.busy[i.key], i.instance_id))

    def _claimants(self, namespace: str, instance_id: str) -> str:
        return ", ".join(sorted({self._claimed[k].agent
                                 for k in self._claims.get((namespace, instance_id), ())}))
