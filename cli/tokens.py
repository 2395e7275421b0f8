"""Reading the bearer token file (never from argv), warning like ssh when it is exposed."""

from __future__ import annotations

import os
import stat
import sys
from typing import TextIO


def read_token_file(path: str, warnings: TextIO | None = None) -> str:
    try:
        info = os.stat(path)
        token = open(path).read().strip()
    except OSError as exc:
        raise OSError(f"cannot read token file {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        (warnings or sys.stderr).write(
            f"Warning: token file {path} is accessible by others "
            f"(mode {stat.S_IMODE(info.st_mode):o}); chmod 600 it\n")
    if not token:
        raise OSError(f"token file {path} is empty")
    return token
