"""The apiserver's settings (YAML file and/or flags)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field, field_validator
from rune.apiserver.audit import AuditSettings
from rune.apiserver.recording import RecordingSettings

from rune import bounds

VERBS = ("exec", "exec-tty", "list", "audit", "observe", "admin")


class CommandRules(BaseModel):
    allowed_commands: list[str] = Field(default_factory=list,
                                        description="if set, only these may run")
    blocked_commands: list[str] = Field(default_factory=list)
    allowed_env: list[str] | None = Field(
        default=None, description="with allowed_commands: the only --env names allowed "
        "(NAME or PREFIX*); unset: any but PATH, LD_*, GIT_*, PYTHON*, … (policy.py)")
    command_dirs: list[str] | None = Field(
        default=None, description="directories whose absolute paths an allowed bare name "
        "may be given as (default /usr/local/sbin … /bin)")


class AgentBinding(BaseModel):
    """What an agent's credential may speak for: the namespaces of its instances."""

    namespaces: list[str] = Field(default_factory=lambda: ["*"])


class TokenEntry(BaseModel):
    """A bearer token as the server keeps it: only its SHA-256, never the token."""

    user: str
    groups: list[str] = Field(default_factory=list)
    sha256: str


class Role(CommandRules):
    verbs: list[str] = Field(description=f"any of {', '.join(VERBS)}, or *")
    namespaces: list[str] = Field(default_factory=lambda: ["*"])

    @field_validator("verbs")
    @classmethod
    def _known(cls, verbs: list[str]) -> list[str]:
        verbs = [v.replace(":", "-") for v in verbs]  # `exec:tty` is `exec-tty`
        unknown = sorted(set(verbs) - {*VERBS, "*"})
        if unknown:
            raise ValueError(f"unknown verbs {unknown}: use {', '.join(VERBS)} or *")
        return verbs


class Binding(BaseModel):
    role: str
    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)


class AuthConfig(BaseModel):
    enabled: bool = Field(default=True, description="false: anyone may do anything")
    tokens: list[TokenEntry] = Field(default_factory=list)
    roles: dict[str, Role] = Field(default_factory=dict)
    bindings: list[Binding] = Field(default_factory=list)
    namespaces: dict[str, CommandRules] = Field(default_factory=dict,
                                                description="command rules per namespace")


class LimitsConfig(BaseModel):
    max_sessions_per_user: int = Field(default=32, description="0 = no limit; off without auth")
    max_sessions_per_agent: int = Field(default=256, description="0 = no limit")
    # ARG_MAX scale, as docker and kubectl accept; hard caps in rune/bounds.py
    max_argv_bytes: int = Field(default=1024 * 1024, description="argv bytes in all (<= 1 MiB)")
    max_argc: int = Field(default=32768, description="arguments (<= 32768)")
    max_env_bytes: int = Field(default=64 * 1024, description="env bytes in all (<= 64 KiB)")


class ApiServerConfig(BaseModel):
    listen: str = "127.0.0.1:8443"
    apiserver_id: str = Field(default="", description="this apiserver among several; "
                              "empty = a new random id at each start")
    share_sessions: bool = Field(default=True, description="share live sessions and "
                                 "session counts with the other apiservers on the broker")
    nats_url: str = "nats://127.0.0.1:4222"
    nats_nkey_seed_file: str | None = None
    prefix: str = "rune"
    max_timeout: float = Field(default=24 * 3600, description="cap on a session's --timeout")
    idle_timeout: float = Field(default=0, description="end sessions with no I/O for this; 0=off")
    window: int = 4 * 1024 * 1024
    heartbeat: float = 2.0
    lost_after: int = 3
    open_timeout: float = 5.0
    max_message: int = 4 * 1024 * 1024
    fanout_window: int = Field(default=256 * 1024,
                               description="per-instance window of a fan-out session")
    fanout_max_parallel: int = Field(default=512, description="cap on --max-parallel")
    metrics_listen: str = Field(default="", description="host:port for /metrics; empty=off")
    audit: AuditSettings = Field(default_factory=AuditSettings)
    recording: RecordingSettings = Field(default_factory=RecordingSettings)
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = Field(default=False, description="allow plaintext on non-loopback")
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @field_validator("apiserver_id")
    @classmethod
    def _apiserver_id(cls, value: str) -> str:
        return bounds.name(value, "apiserver_id") if value else value

    exec: CommandRules = Field(default_factory=CommandRules,
                               description="command rules for everyone")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    agents: dict[str, AgentBinding] = Field(
        default_factory=dict, description="per agent id: the namespaces whose instances it "
        "may register (an agent not listed: any)")


def load(path: str | Path | None) -> ApiServerConfig:
    if not path:
        return ApiServerConfig()
    return ApiServerConfig.model_validate(yaml.safe_load(Path(path).read_text()) or {})
