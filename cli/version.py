"""Rune's version, and the identity of this install (standard library only: the fast path)."""

from __future__ import annotations

import hashlib
import os

import rune

VERSION = "0.1.0"  # kept equal to pyproject's version (tests/test_cli_polish.py checks)


def build_id() -> str:
    """VERSION plus a digest of the installed CLI and core modules' names, sizes and times.

    A multiplexer started from another install (or before an upgrade) reports another
    id, so a client can tell that it must be replaced. RUNE_MUX_BUILD_ID stands in for
    the digest (to try an upgrade without installing twice).
    """
    if os.environ.get("RUNE_MUX_BUILD_ID"):
        return os.environ["RUNE_MUX_BUILD_ID"]
    here = os.path.dirname(os.path.abspath(__file__))
    core = list(rune.__path__)[0]
    digest = hashlib.sha256(VERSION.encode())
    for folder in (here, core):
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith(".py"):
                info = entry.stat()
                digest.update(f"{entry.name}:{info.st_size}:{info.st_mtime_ns};".encode())
    return f"{VERSION}+{digest.hexdigest()[:12]}"
