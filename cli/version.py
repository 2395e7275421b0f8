"""Rune's version, and the identity of this install (standard library only: the fast path)."""

from __future__ import annotations

import os

import rune

VERSION = "0.1.0"  # kept equal to pyproject's version (tests/test_cli_polish.py checks)


def build_id() -> str:
    """VERSION plus the newest time, total size and number of the CLI and core modules.

    A multiplexer started from another install (or before an upgrade) reports another
    id, so a client can tell that it must be replaced. RUNE_MUX_BUILD_ID stands in for
    it (to try an upgrade without installing twice).
    """
    if os.environ.get("RUNE_MUX_BUILD_ID"):
        return os.environ["RUNE_MUX_BUILD_ID"]
    here = os.path.dirname(os.path.abspath(__file__))
    newest = total = count = 0
    for folder in (here, list(rune.__path__)[0]):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith(".py"):
                info = entry.stat()
                newest = max(newest, info.st_mtime_ns)
                total += info.st_size
                count += 1
    # No hashlib: loading OpenSSL would cost the fast path more than all the rest.
    return f"{VERSION}+{newest:x}.{total:x}.{count}"
