"""Pydantic models shared by the apiserver and the agents (never on the data path)."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

InstanceState = Literal["starting", "running", "exited", "restarting", "stopped", "lost"]
INSTANCE_MARK = "-instance-"


class InstanceInfo(BaseModel):
    """One registry entry: what an agent says about an instance it owns."""

    namespace: str
    service: str
    instance_id: str
    state: InstanceState
    agent: str
    host: str
    runner: Literal["process", "docker"]
    labels: dict[str, str] = Field(default_factory=dict)
    updated: float = Field(default_factory=time.time)

    @property
    def key(self) -> str:
        # The agent comes first so that broker permissions can limit each agent to its own
        # keys ($KV.<bucket>.<agent>.>), and readers can check who wrote an entry.
        return f"{self.agent}.{self.namespace}.{self.instance_id}"


class ExecOpen(BaseModel):
    """The apiserver's request to an agent to open a session (rune.agent.<id>.exec)."""

    session_id: str
    namespace: str
    instance_id: str
    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str = ""
    tty: bool = False
    width: int = 80
    height: int = 24
    timeout: float = 300.0
    user: str = ""  # the rune user who asked (for audit), not an OS account
    window: int = 4 * 1024 * 1024
    heartbeat: float = 2.0
    lost_after: int = 3


class ExecOpened(BaseModel):
    """The agent's reply: either started (with where) or an error."""

    ok: bool
    host: str = ""
    pid: int = 0
    error: dict | None = None
