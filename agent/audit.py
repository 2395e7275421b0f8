"""What only the agent knows goes to the audit trail: sessions it ended on its own."""

from __future__ import annotations

import time

from nats.aio.client import Client as NATS

from rune import audit as schema
from rune.audit import BufferedPublisher
from rune.subjects import Subjects


class AgentAudit:
    def __init__(self, nc: NATS, subjects: Subjects, agent_id: str, host: str,
                 limit: int = 1000) -> None:
        self.subjects = subjects
        self.agent_id = agent_id
        self.host = host
        # The agent may publish to the audit subjects but never creates the stream.
        self.publisher = BufferedPublisher(nc, "agent audit", limit)

    async def start(self) -> None:
        await self.publisher.start()

    async def stop(self) -> None:
        await self.publisher.stop()

    def session_lost(self, session: object) -> None:
        """The apiserver went silent, so the agent killed the command: say so."""
        request = session.request
        link = session.link
        event = schema.make_event(
            schema.FAILED, source="agent", session_id=request.session_id,
            user=request.user, namespace=request.namespace, instance=request.instance_id,
            agent=self.agent_id, host=self.host, argv=list(request.argv), tty=request.tty,
            workdir=request.workdir, env_keys=sorted(request.env),
            duration=round(time.monotonic() - session.started, 3),
            bytes_in=link.bytes_in, bytes_out=link.bytes_out, code="unavailable",
            reason=str(link.lost), stage="running")
        # Under the agent's own subject: no agent can speak as the apiserver (or another).
        subject = self.subjects.agent_audit(request.namespace, self.agent_id, schema.FAILED)
        self.publisher.submit(subject,
                              schema.encode(event), event["id"])
