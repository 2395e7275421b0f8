"""Server-side sign-in sessions: the rune token stays here, the browser holds a random id.

The cookie is HttpOnly and SameSite=Strict (Secure under TLS); every state-changing
request must also carry the session's CSRF token, compared in constant time.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

COOKIE = "rune_dashboard"
LOGIN_COOKIE = "rune_dashboard_login"  # double-submit CSRF token of the sign-in form
CSRF_HEADER = "X-CSRF-Token"


@dataclass
class SignIn:
    token: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)


class SignIns:
    """Sign-ins by id, bounded in number and age (oldest go first)."""

    def __init__(self, max_age: float = 12 * 3600, idle: float = 3600,
                 limit: int = 1000) -> None:
        self.max_age = max_age
        self.idle = idle
        self.limit = limit
        self._by_id: dict[str, SignIn] = {}

    def create(self, token: str) -> tuple[str, SignIn]:
        self._expire()
        while len(self._by_id) >= self.limit:
            del self._by_id[next(iter(self._by_id))]
        sid = secrets.token_urlsafe(32)
        signin = SignIn(token=token)
        self._by_id[sid] = signin
        return sid, signin

    def get(self, sid: str | None) -> SignIn | None:
        if not sid:
            return None
        signin = self._by_id.get(sid)
        if signin is None:
            return None
        now = time.monotonic()
        if now - signin.created > self.max_age or now - signin.seen > self.idle:
            del self._by_id[sid]
            return None
        signin.seen = now
        return signin

    def drop(self, sid: str | None) -> None:
        self._by_id.pop(sid or "", None)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid, s in list(self._by_id.items()):
            if now - s.created > self.max_age or now - s.seen > self.idle:
                del self._by_id[sid]


def same_secret(given: str | None, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())
