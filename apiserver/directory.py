"""The apiserver's live view of every instance, watched from the registry KV bucket."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from nats.aio.client import Client as NATS
from pydantic import ValidationError

from rune.errors import NotFound, NotRunning
from rune.models import INSTANCE_MARK, InstanceInfo
from rune.registry import open_instances_bucket
from rune.subjects import Subjects

log = logging.getLogger(__name__)


class InstanceDirectory:
    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self._nc = nc
        self._subjects = subjects
        self.instances: dict[str, InstanceInfo] = {}
        self.busy: Counter[str] = Counter()
        self._task: asyncio.Task | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        kv = await open_instances_bucket(self._nc, self._subjects)
        watcher = await kv.watchall()
        self._task = asyncio.create_task(self._follow(watcher))
        await self.ready.wait()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _follow(self, watcher: object) -> None:
        async for entry in watcher:
            if entry is None:  # the watcher's "caught up" marker
                self.ready.set()
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self.instances.pop(entry.key, None)
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
            self.instances[entry.key] = info

    def list(self, namespace: str | None = None) -> list[InstanceInfo]:
        items = [i for i in self.instances.values()
                 if namespace is None or i.namespace == namespace]
        return sorted(items, key=lambda i: (i.namespace, i.service, i.instance_id))

    def resolve(self, namespace: str, target: str) -> InstanceInfo:
        """A service name → its least busy running instance; an instance id → that one."""
        if INSTANCE_MARK in target:
            info = next((i for i in self.instances.values()
                         if i.namespace == namespace and i.instance_id == target), None)
            if info is None:
                raise NotFound(f'instance not found: no instance "{target}" in namespace '
                               f'"{namespace}"')
            if info.state != "running":
                raise NotRunning(f'instance not running: "{target}" is {info.state}')
            return info
        candidates = [i for i in self.instances.values()
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
