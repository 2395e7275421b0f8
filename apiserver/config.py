"""The apiserver's settings (YAML file and/or flags)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field

from apiserver.audit import AuditSettings
from apiserver.recording import RecordingSettings


class ApiServerConfig(BaseModel):
    listen: str = "127.0.0.1:8443"
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


def load(path: str | Path | None) -> ApiServerConfig:
    if not path:
        return ApiServerConfig()
    return ApiServerConfig.model_validate(yaml.safe_load(Path(path).read_text()) or {})
