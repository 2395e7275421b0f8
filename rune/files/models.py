"""The apiserver's request to an agent to open a copy session (on rune.agent.<id>.exec)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from rune import bounds
from rune.files.entries import CopyLimits

COPY_KINDS = ("cp-read", "cp-write")
MAX_PATHS = 4096
CHOWN = re.compile(r"[0-9]{1,10}:[0-9]{1,10}")


def check_path(value: str, what: str = "path") -> str:
    if not value or "\0" in value:
        raise ValueError(f"{what} is empty or contains a NUL byte")
    if len(value.encode("utf-8", "surrogateescape")) > bounds.MAX_PATH_BYTES:
        raise ValueError(f"{what} is longer than {bounds.MAX_PATH_BYTES} bytes")
    if ".." in value.split("/"):
        raise ValueError(f"{what} {value!r}: '..' is not allowed")
    return value


class CopyOpen(BaseModel):
    """cp-read: the agent sends `paths` as a tree; cp-write: it writes one into `dest`."""

    kind: Literal["cp-read", "cp-write"]
    session_id: str
    namespace: str
    instance_id: str
    paths: list[str] = Field(default_factory=list, max_length=MAX_PATHS)
    dest: str = ""
    multiple: bool = False
    recursive: bool = False
    follow: bool = False
    preserve: bool = False
    pack: bool = False  # cp-read: small files may go whole in FILE_PACK frames
    chown: str = ""  # "uid:gid", only where policy allowed it
    timeout: float = 3600.0
    user: str = ""  # the rune user who asked (for audit), not an OS account
    window: int = 4 * 1024 * 1024
    heartbeat: float = 2.0
    lost_after: int = Field(default=3, ge=1, le=1000)
    limits: CopyLimits = Field(default_factory=CopyLimits)

    @field_validator("session_id", "namespace", "instance_id")
    @classmethod
    def _names(cls, value: str, info: object) -> str:
        return bounds.name(value, info.field_name.replace("_", " "))

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        return [check_path(p, "source") for p in value]

    @field_validator("dest")
    @classmethod
    def _dest(cls, value: str) -> str:
        return check_path(value, "destination") if value else value

    @field_validator("chown")
    @classmethod
    def _chown(cls, value: str) -> str:
        if value and not CHOWN.fullmatch(value):
            raise ValueError("chown must be numeric uid:gid")
        return value

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

    def check_shape(self) -> CopyOpen:
        if self.kind == "cp-read" and not self.paths:
            raise ValueError("cp-read needs at least one source path")
        if self.kind == "cp-write" and not self.dest:
            raise ValueError("cp-write needs a destination")
        return self
