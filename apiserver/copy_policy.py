"""Who may copy what: the cp verbs, per-role path prefixes, --chown, and the size caps."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

from pydantic import BaseModel, Field

from rune.errors import PermissionDenied
from rune.files.entries import CopyLimits


class PathRules(BaseModel):
    """Remote path prefixes a role may copy from or to; deny wins over allow."""

    allow: list[str] = Field(default_factory=list, description="if set, only below these")
    deny: list[str] = Field(default_factory=list)

    def refusal(self, path: str) -> str | None:
        if self.deny and any(_below(path, p) for p in self.deny):
            return f"{path} is below a denied prefix"
        if self.allow and not any(_below(path, p) for p in self.allow):
            return f"{path} is not below an allowed prefix ({', '.join(self.allow)})"
        return None


class CopySettings(BaseModel):
    limits: CopyLimits = Field(default_factory=CopyLimits,
                               description="caps on one copy: bytes, files, path depth")
    window: int = Field(default=16 * 1024 * 1024, ge=1024 * 1024, le=256 * 1024 * 1024,
                        description="bytes of file data in flight per copy and direction: "
                        "credit is returned every quarter of it, so the sender never waits "
                        "on a round trip")


def _below(path: str, prefix: str) -> bool:
    path, prefix = posixpath.normpath(path), posixpath.normpath(prefix)
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def check_paths(authz: object, identity: object, verb: str, namespace: str,
                paths: Sequence[str], chown: bool) -> None:
    """Raises PermissionDenied unless one granting role allows every path (and --chown).
    Relative remote paths are checked as given and also refused by an allowlist."""
    granting = getattr(authz, "_granting", None)
    if granting is None:  # open access: no roles, no rules
        return
    roles = [authz.roles[name] for name in granting(identity, verb, namespace)]
    refusals = []
    for role in roles:
        rules: PathRules = role.cp_paths
        why = next((r for r in (rules.refusal(p) for p in paths) if r), None)
        if why is None and chown and not role.cp_chown:
            why = "--chown is not allowed"
        if why is None:
            return
        refusals.append(why)
    raise PermissionDenied(f"permission denied: {refusals[0] if refusals else verb}")
