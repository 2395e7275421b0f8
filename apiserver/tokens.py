"""Bearer tokens: made once, kept server-side only as SHA-256, checked in constant time.

A token is 32 random bytes (256 bits): a plain SHA-256 suffices to store it, since
nobody can brute-force a preimage of that much entropy; slow password hashes only
help for guessable secrets, and would cost every RPC.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import yaml
from rune.apiserver.auth import Identity
from rune.apiserver.config import TokenEntry

from rune.errors import Unauthenticated

TOKEN_PREFIX = "rune_"
log = logging.getLogger(__name__)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenAuthenticator:
    """Turns an `authorization: Bearer …` header into an Identity, or refuses."""

    def __init__(self, entries: Sequence[TokenEntry]) -> None:
        self.entries = [(bytes.fromhex(e.sha256), e) for e in entries]

    def authenticate(self, metadata: Sequence[tuple[str, str]]) -> Identity:
        header = next((v for k, v in metadata if k.lower() == "authorization"), None)
        if header is None:
            raise Unauthenticated("authentication failed: no bearer token given "
                                  "(use --token-file, RUNE_TOKEN_FILE or the config file)")
        scheme, _, token = str(header).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authentication failed: malformed authorization header")
        presented = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for stored, entry in self.entries:  # compare with every entry: no early exit
            if hmac.compare_digest(presented, stored):
                found = entry
        if found is None:
            # Logged without the token: a mistyped token is often another valid one.
            log.warning("authentication failed: unknown token (sha256 prefix %s)",
                        presented.hex()[:8])
            raise Unauthenticated("authentication failed: invalid token")
        return Identity(user=found.user, groups=tuple(found.groups))


def create_token(config_path: str | Path, user: str, groups: Sequence[str] = ()) -> str:
    """Adds a new token for `user` to the YAML config (its hash only) and returns it."""
    path = Path(config_path)
    data = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
    token = new_token()
    entry = TokenEntry(user=user, groups=list(groups), sha256=digest(token))
    auth = data.setdefault("auth", {})
    auth.setdefault("tokens", []).append(entry.model_dump())
    if not path.exists():  # a new config is private from the start
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return token
