"""Pydantic models shared by the apiserver and the agents (never on the data path)."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator

from rune import bounds


def _named(check: object) -> AfterValidator:
    """A bounds check given the field's name, for the message."""
    return AfterValidator(lambda value, info: check(value, info.field_name.replace("_", " ")))


# Request fields with their bounds (rune/bounds.py), shared by every request model.
Name = Annotated[str, _named(bounds.name)]
Argv = Annotated[list[str], AfterValidator(bounds.argv)]
Env = Annotated[dict[str, str], AfterValidator(bounds.env)]
Workdir = Annotated[str, AfterValidator(bounds.workdir)]
TerminalSize = Annotated[int, _named(bounds.terminal_size)]
Seconds = Annotated[float, _named(bounds.timeout)]

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


# A batch open on rune.agent.<id>.exec (apiserver/open_batch.py sends it, the agent's
# server answers it): {"kind": EXEC_BATCH, "opens": [<packed open>, ...]}, at most this many.
EXEC_BATCH = "exec_batch"
MAX_BATCH_OPENS = 256


class ExecOpen(BaseModel):
    """The apiserver's request to an agent to open a session (rune.agent.<id>.exec)."""

    # The agent trusts no caller: the same bounds as the apiserver's, checked again here.
    session_id: Name
    namespace: Name
    instance_id: Name
    argv: Argv
    env: Env = Field(default_factory=dict)
    workdir: Workdir = ""
    tty: bool = False
    width: TerminalSize = 80
    height: TerminalSize = 24
    timeout: Seconds = 300.0
    user: str = ""  # the rune user who asked (for audit), not an OS account
    window: int = 4 * 1024 * 1024
    heartbeat: Seconds = 2.0
    lost_after: int = Field(default=3, ge=1, le=1000)
    # False: nothing will ever be forwarded (a fan-out member), so the agent closes the
    # command's stdin itself at once instead of waiting for a STDIN_EOF frame.
    stdin: bool = True

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
    packs: bool = False  # a copy: the agent takes FILE_PACK frames (rune/files/pack.py)
    stdin_closed: bool = False  # the agent closed stdin itself (ExecOpen.stdin was False)


def first_problem(exc: ValueError) -> str:
    """One line naming the field a request failed on, from a pydantic ValidationError."""
    errors_of = getattr(exc, "errors", None)
    if not callable(errors_of):
        return str(exc)
    problem = errors_of()[0]
    field = ".".join(str(p) for p in problem.get("loc", ())) or "request"
    message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{field}: {message}"
