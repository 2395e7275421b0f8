"""Who is calling, and may they: the seam where authentication and RBAC plug in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...] = field(default_factory=tuple)


class Authenticator(Protocol):
    def authenticate(self, metadata: Sequence[tuple[str, str]]) -> Identity:
        """Raises Unauthenticated when the caller cannot be identified."""
        ...


class Authorizer(Protocol):
    def authorize(self, identity: Identity, verb: str, namespace: str,
                  argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None) -> None:
        """Raises PermissionDenied when `identity` may not do `verb` in `namespace`."""
        ...

    def allows(self, identity: Identity, verb: str, namespace: str) -> bool:
        """Whether `identity` may do `verb` in `namespace` (for filtering listings)."""
        ...


class OpenAccess:
    """Everyone may do everything: only for a stack with no auth configured."""

    def authenticate(self, metadata: Sequence[tuple[str, str]]) -> Identity:
        return Identity(user="anonymous")

    def authorize(self, identity: Identity, verb: str, namespace: str,
                  argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None) -> None:
        return None

    def allows(self, identity: Identity, verb: str, namespace: str) -> bool:
        return True
