"""Pydantic models shared by the apiserver and the agents (never on the data path)."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from rune import bounds

# "lost" and "conflict" are never written by an agent: the apiserver's directory shows them
# (an agent gone silent; an instance id that two agents claim).
InstanceState = Literal["starting", "running", "exited", "restarting", "stopped", "lost",
                        "conflict"]
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
    lost_after: int = Field(default=3, ge=1, le=1000)

    # The agent trusts no caller: the same bounds as the apiserver's, checked again here.
    @field_validator("session_id", "namespace", "instance_id")
    @classmethod
    def _names(cls, value: str, info: object) -> str:
        return bounds.name(value, info.field_name.replace("_", " "))

    @field_validator("argv")
    @classmethod
    def _argv(cls, value: list[str]) -> list[str]:
        return bounds.argv(value)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return bounds.env(value)

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str) -> str:
        return bounds.workdir(value)

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int, info: object) -> int:
        return bounds.terminal_size(value, info.field_name)

    @field_validator("timeout", "heartbeat")
    @classmethod
    def _seconds(cls, value: float, info: object) -> float:
        return bounds.timeout(value, info.field_name)

    @field_validator("window")
    @classmethod
    def _window(cls, value: int) -> int:
        if not 1024 <= value <= 256 * 1024 * 1024:
            raise ValueError(f"window {value} is out of range 1 KiB-256 MiB")
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if len(value) > 256:
            raise ValueError("user name is longer than 256 characters")
        return value


class ExecOpened(BaseModel):
    """The agent's reply: either started (with where) or an error."""

    ok: bool
    host: str = ""
    pid: int = 0
    error: dict | None = None


def first_problem(exc: ValueError) -> str:
    """One line naming the field a request failed on, from a pydantic ValidationError."""
    errors_of = getattr(exc, "errors", None)
    if not callable(errors_of):
        return str(exc)
    problem = errors_of()[0]
    field = ".".join(str(p) for p in problem.get("loc", ())) or "request"
    message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{field}: {message}"
