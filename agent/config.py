"""The agent's YAML config: who it is, where NATS is, and the services it runs."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, field_validator

from rune.models import INSTANCE_MARK
from rune.subjects import check_token


class NatsSettings(BaseModel):
    url: str = "nats://127.0.0.1:4222"
    nkey_seed_file: str | None = None
    prefix: str = "rune"


class ServiceSpec(BaseModel):
    """What every declared service has, whichever runner starts its replicas."""

    name: str
    namespace: str = "default"
    replicas: int = Field(default=1, ge=0, le=10000)
    workdir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("command", mode="before", check_fields=False)
    @classmethod
    def _split(cls, value: object) -> object:
        return shlex.split(value) if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        check_token(value, "service name")
        if INSTANCE_MARK.strip("-") in value:
            raise ValueError(f"service name {value!r} must not contain 'instance'")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return check_token(value, "namespace")


class IsolationSettings(BaseModel):
    """What a process service's instances, and every exec into them, must not see of the
    host (agent/isolation.py)."""

    hide_paths: list[str] = Field(
        default_factory=list,
        description="absolute paths hidden from the service: a directory is covered by an "
        "empty read-only tmpfs, a file by /dev/null; the instance's own directory stays")

    @field_validator("hide_paths")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        for path in value:
            if not os.path.isabs(path) or "\0" in path:
                raise ValueError(f"hide_paths: {path!r} is not an absolute path")
        return [os.path.normpath(p) for p in value]


class ProcessService(ServiceSpec):
    command: list[str]
    isolation: IsolationSettings | None = None


class DockerService(ServiceSpec):
    """A service whose replicas the agent runs as containers (the engine restarts them)."""

    image: str
    command: list[str] | None = None
    replicas: int = Field(default=1, ge=0, le=1000)
    network_mode: str | None = None


class DockerSettings(BaseModel):
    enabled: bool = False
    base_url: str | None = Field(default=None, description="engine URL; default: DOCKER_HOST "
                                 "or the local socket")
    match_labels: dict[str, str] = Field(
        default_factory=dict,
        description="adopt only labelled containers that also carry these labels")
    services: list[DockerService] = Field(default_factory=list)
    threads: int = Field(default=32, ge=2, description="threads for the synchronous SDK")
    direct_exec: bool = Field(default=True, description="execs run by the container's "
                              "runc on this host and adopted by the agent, not relayed by "
                              "the engine (agent/runners/runc_exec.py); where it cannot, "
                              "the engine")
    runc_root: str = Field(default="/run/docker/runtime-runc/moby", description="where the "
                           "engine's runc keeps its containers' state")
    parked_starts: bool = Field(default=True, description="on the runc route, keep the "
                                "next exec's start made in advance in each container that "
                                "had one (agent/runners/parked.py): one small process "
                                "there, saves runc's ~35 ms per exec")
    parked_idle: float = Field(default=600.0, gt=0, le=86400, description="seconds a parked "
                               "start waits unused before it is let go")


class AgentConfig(BaseModel):
    agent_id: str
    host: str = ""
    nats: NatsSettings = Field(default_factory=NatsSettings)
    state_dir: str = Field(default="", description="default /var/lib/rune-agent as root, "
                           "else $XDG_STATE_HOME/rune-agent (agent/statedir.py)")
    instances_dir: str = Field(default="", description="the instances' own directories; "
                               "default <state_dir>/instances, or <state_dir>-instances "
                               "when some instance runs as another user")
    default_user: str | None = Field(default=None, description="the user of process "
                                     "services without user: when the agent runs as root "
                                     "(e.g. nobody); unset: root, with a warning")
    services: list[ProcessService] = Field(default_factory=list)
    docker: DockerSettings = Field(default_factory=DockerSettings)
    max_sessions: int = 256
    exit_grace: float = Field(default=1.0, description="how long to wait for pipes after exit")
    kill_grace: float = Field(default=2.0, description="SIGHUP/SIGTERM to SIGKILL when ending")
    metrics_listen: str = Field(default="", description="host:port for /metrics; empty=off")

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, value: str) -> str:
        return check_token(value, "agent_id")


def load(path: str | Path) -> AgentConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    return AgentConfig.model_validate(data)
