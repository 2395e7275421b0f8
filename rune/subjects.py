"""Every NATS subject and bucket name, built in exactly this one place."""

from __future__ import annotations

from dataclasses import dataclass

from rune import bounds


def check_token(value: str, what: str) -> str:
    """Ids that become subject tokens: no wildcards, dots, spaces or newlines, in full."""
    return bounds.name(value, what)


@dataclass(frozen=True)
class Subjects:
    prefix: str = "rune"

    def agent_exec(self, agent: str) -> str:
        return f"{self.prefix}.agent.{agent}.exec"

    def agent_ping(self, agent: str) -> str:
        return f"{self.prefix}.agent.{agent}.ping"

    def agent_all(self, agent: str) -> str:
        return f"{self.prefix}.agent.{agent}.>"

    def session_in(self, agent: str, session: str) -> str:
        return f"{self.prefix}.in.{agent}.{session}"

    def session_out(self, agent: str, session: str) -> str:
        return f"{self.prefix}.out.{agent}.{session}"

    def agent_sessions_in(self, agent: str) -> str:
        """Every session's input to the agent: its LinkHub subscription."""
        return f"{self.prefix}.in.{agent}.*"

    def agent_sessions_out(self, agent: str) -> str:
        """Every session's output of the agent: the apiserver's LinkHub subscription."""
        return f"{self.prefix}.out.{agent}.*"

    def agent_in_all(self, agent: str) -> str:
        return f"{self.prefix}.in.{agent}.>"

    def agent_out_all(self, agent: str) -> str:
        return f"{self.prefix}.out.{agent}.>"

    def agent_heartbeat(self, agent: str) -> str:
        # An agent may publish only under rune.out.<its id>, so its liveness lives there too.
        return f"{self.prefix}.out.{agent}._alive"

    def all_agent_heartbeats(self) -> str:
        return f"{self.prefix}.out.*._alive"

    def heartbeat_agent(self, subject: str) -> str | None:
        """The agent id of a liveness subject, None when the subject is not one."""
        head, tail = f"{self.prefix}.out.", "._alive"
        if not (subject.startswith(head) and subject.endswith(tail)):
            return None
        agent = subject[len(head):-len(tail)]
        return agent if bounds.NAME.fullmatch(agent) else None

    def audit(self, namespace: str, event: str) -> str:
        return f"{self.prefix}.audit.{namespace}.{event}"

    def agent_audit(self, namespace: str, agent: str, event: str) -> str:
        """What an agent reports: `<prefix>.audit.<ns>.agent.<agent>.<event>`, apart from
        the apiserver's `<prefix>.audit.<ns>.session.*`, and fenced per agent by the broker."""
        return f"{self.prefix}.audit.{namespace}.agent.{agent}.{event}"

    def agent_audit_all(self, agent: str) -> str:
        return f"{self.prefix}.audit.*.agent.{agent}.>"

    def audit_all(self) -> str:
        return f"{self.prefix}.audit.>"

    def audit_namespace(self, namespace: str) -> str:
        return f"{self.prefix}.audit.{namespace}.>"

    def recording_meta(self, session: str) -> str:
        return f"{self.prefix}.rec.{session}.meta"

    def recording_data(self, session: str) -> str:
        return f"{self.prefix}.rec.{session}.data"

    def recording_meta_all(self) -> str:
        return f"{self.prefix}.rec.*.meta"

    def recording_all(self) -> str:
        return f"{self.prefix}.rec.>"

    def inbox(self, component: str) -> str:
        """A component's private reply-inbox prefix, so broker permissions can fence it."""
        return f"_INBOX_{self.prefix}.{component}"

    def agent_inbox(self, agent: str) -> str:
        return self.inbox(f"agent.{agent}")

    @property
    def instances_bucket(self) -> str:
        return f"{self.prefix}_instances"

    @property
    def sessions_bucket(self) -> str:
        """Every apiserver's live sessions and leases (apiserver/peers.py)."""
        return f"{self.prefix}_sessions"

    def apiserver_kill(self, apiserver: str) -> str:
        return f"{self.prefix}.apiserver.{apiserver}.kill"

    def apiserver_all(self) -> str:
        return f"{self.prefix}.apiserver.>"

    @property
    def audit_stream(self) -> str:
        return f"{self.prefix.upper()}_AUDIT"

    @property
    def recordings_stream(self) -> str:
        return f"{self.prefix.upper()}_RECORDINGS"
