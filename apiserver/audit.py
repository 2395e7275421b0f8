"""The apiserver's audit trail: its JetStream stream, session events, and reading them back."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import BadRequestError
from pydantic import BaseModel, Field

from rune import audit as schema
from rune.audit import BufferedPublisher
from rune.subjects import Subjects, check_token

log = logging.getLogger(__name__)

DAY = 24 * 3600.0


class AuditSettings(BaseModel):
    max_age: float = Field(default=90 * DAY, description="seconds an event is kept; 0=forever")
    max_bytes: int = Field(default=1 << 30, description="stream size cap; oldest go first")
    buffer: int = Field(default=10000, description="events held while the stream is away")


async def ensure_stream(nc: NATS, name: str, subjects: list[str], max_age: float,
                        max_bytes: int, description: str) -> None:
    """Creates the stream, or brings an existing one to this retention: idempotent."""
    config = StreamConfig(name=name, subjects=subjects, description=description,
                          max_age=max_age or None, max_bytes=max_bytes or -1,
                          duplicate_window=min(120.0, max_age) if max_age else 120.0)
    js = nc.jetstream()
    try:
        await js.add_stream(config)
    except BadRequestError:  # exists with other settings
        await js.update_stream(config)


async def read_stream(nc: NATS, stream: str, subject: str, since: float | None = None,
                      follow: bool = False, last_per_subject: bool = False,
                      batch: int = 256) -> AsyncIterator[Any]:
    """Yields the stream's messages on `subject` in order; with `follow`, then new ones."""
    js = nc.jetstream()
    if last_per_subject:
        policy, start = DeliverPolicy.LAST_PER_SUBJECT, None
    elif since:
        policy, start = DeliverPolicy.BY_START_TIME, datetime.fromtimestamp(since, UTC)
    else:
        policy, start = DeliverPolicy.ALL, None
    config = ConsumerConfig(deliver_policy=policy, opt_start_time=start,
                            ack_policy=AckPolicy.NONE, inactive_threshold=60.0,
                            mem_storage=True)
    sub = await js.pull_subscribe(subject, stream=stream, config=config)
    try:
        info = await sub.consumer_info()
        pending = info.num_pending
        while follow or pending > 0:
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except (TimeoutError, NatsTimeout):
                continue
            for msg in msgs:
                pending = msg.metadata.num_pending
                yield msg
    finally:
        try:
            await js.delete_consumer(stream, (await sub.consumer_info()).name)
        except Exception:
            pass  # inactive_threshold removes it anyway
        await sub.unsubscribe()


def subject_token(namespace: str) -> str:
    """A namespace as a subject token; one that cannot be (from a bad request) is '_invalid'."""
    try:
        return check_token(namespace, "namespace")
    except ValueError:
        return "_invalid"


class Auditor:
    """Publishes audit events without ever waiting, and answers audit queries."""

    def __init__(self, nc: NATS, subjects: Subjects, settings: AuditSettings) -> None:
        self.nc = nc
        self.subjects = subjects
        self.settings = settings
        self.publisher = BufferedPublisher(nc, "audit", settings.buffer, ensure=self._ensure)

    async def _ensure(self) -> None:
        await ensure_stream(self.nc, self.subjects.audit_stream, [self.subjects.audit_all()],
                            self.settings.max_age, self.settings.max_bytes,
                            "Rune Exec audit events (JSON, see README)")

    async def start(self) -> None:
        await self.publisher.start()

    async def stop(self) -> None:
        await self.publisher.stop()

    def emit(self, event: dict[str, Any]) -> None:
        subject = self.subjects.audit(subject_token(event.get("namespace", "")), event["event"])
        self.publisher.submit(subject, schema.encode(event), event["id"])

    async def query(self, namespace: str | None = None, user: str | None = None,
                    since: float | None = None,
                    follow: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Events in stream order, filtered by namespace (in NATS) and user (here)."""
        subject = (self.subjects.audit_namespace(subject_token(namespace)) if namespace
                   else self.subjects.audit_all())
        try:
            await self._ensure()
        except Exception as exc:
            log.warning("audit stream unavailable: %s", exc)
            from rune.errors import Unavailable

            raise Unavailable(f"audit stream unavailable: {exc}") from None
        async for msg in read_stream(self.nc, self.subjects.audit_stream, subject, since,
                                     follow):
            try:
                event = json.loads(msg.data)
            except ValueError:
                continue
            if user and event.get("user") != user:
                continue
            yield event
            await asyncio.sleep(0)
