"""Publishes the agent's instances to the JetStream KV bucket everyone reads."""

from __future__ import annotations

import logging

from nats.aio.client import Client as NATS

from rune.models import InstanceInfo
from rune.registry import open_instances_bucket
from rune.subjects import Subjects

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self._nc = nc
        self._subjects = subjects
        self._kv = None
        self.current: dict[str, InstanceInfo] = {}

    async def open(self) -> None:
        self._kv = await open_instances_bucket(self._nc, self._subjects)

    async def publish(self, info: InstanceInfo) -> None:
        self.current[info.key] = info
        try:
            await self._kv.put(info.key, info.model_dump_json().encode())
        except Exception as exc:  # a broker blip; republish_all() runs on reconnect
            log.warning("registry update of %s failed: %s", info.key, exc)

    async def republish_all(self) -> None:
        for info in list(self.current.values()):
            await self.publish(info)

    async def remove(self, info: InstanceInfo) -> None:
        self.current.pop(info.key, None)
        try:
            await self._kv.delete(info.key)
        except Exception as exc:
            log.warning("registry delete of %s failed: %s", info.key, exc)
