"""A tree as a stream of entries, and the rules every receiver applies to a peer's entries.

    header  {"path": "top/sub/name", "kind": "file"|"dir"|"symlink", "size": int,
             "mode": int, "mtime": float, "target": str}
    data    bytes of the file, in order (files only)
    end     {"size": int, "sha256": hex}  (files only)

Paths are relative, "/"-separated, and start with the name of the source they came
from; dirs come before what they hold. Nothing else is a valid entry: no absolute
path, no `..`, no NUL, no device, FIFO or socket, no setuid/setgid bit.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

KINDS = ("file", "dir", "symlink")
MODE_BITS = 0o1777  # permissions and sticky; setuid/setgid are always stripped
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


class CopyLimits(BaseModel):
    """Caps on one copy, applied by whichever side receives."""

    max_bytes: int = Field(default=64 * 1024 ** 3, ge=0, description="0 = no cap")
    max_files: int = Field(default=1_000_000, ge=1)
    max_depth: int = Field(default=128, ge=1, le=1024)


class EntryRefused(ValueError):
    """One entry of a peer's stream breaks the rules; the message says which."""


@dataclass
class Header:
    path: str
    kind: str
    size: int = 0
    mode: int = 0o644
    mtime: float = 0.0
    target: str = ""

    def wire(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "size": self.size, "mode": self.mode,
                "mtime": self.mtime, "target": self.target}


def check_relative(path: str, max_depth: int) -> list[str]:
    """The components of a peer's relative path, or EntryRefused saying what is wrong."""
    if not isinstance(path, str) or not path:
        raise EntryRefused("entry without a path")
    if "\0" in path:
        raise EntryRefused(f"{path!r}: path contains a NUL byte")
    if path.startswith("/"):
        raise EntryRefused(f"{path}: absolute path refused")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise EntryRefused(f"{path[:64]}...: path longer than {MAX_PATH_BYTES} bytes")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise EntryRefused(f"{path}: '{part or '//'}' is not allowed in a path")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise EntryRefused(f"{path}: a name is longer than {MAX_NAME_BYTES} bytes")
    if len(parts) > max_depth:
        raise EntryRefused(f"{path}: deeper than {max_depth} levels")
    return parts


def check_link_target(path: str, target: str) -> str:
    """A symlink may point only inside the tree being copied, relatively."""
    if not target or "\0" in target:
        raise EntryRefused(f"{path}: symlink with an empty or NUL target")
    if target.startswith("/"):
        raise EntryRefused(f"{path} -> {target}: symlink to an absolute path refused")
    # Resolved lexically from the link's directory, it must stay below the tree's top.
    where = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    if where == ".." or where.startswith("../") or where.split("/")[0] != path.split("/")[0]:
        raise EntryRefused(f"{path} -> {target}: symlink points outside the copied tree")
    return target


def parse_header(payload: object, limits: CopyLimits) -> Header:
    if not isinstance(payload, dict):
        raise EntryRefused("malformed entry header")
    path = payload.get("path")
    check_relative(path, limits.max_depth)
    kind = payload.get("kind")
    if kind not in KINDS:
        raise EntryRefused(f"{path}: {kind!r} files are not copied (only files, "
                           "directories and symlinks)")
    size, mode, mtime = payload.get("size", 0), payload.get("mode", 0o644), \
        payload.get("mtime", 0.0)
    if not isinstance(size, int) or size < -1:
        raise EntryRefused(f"{path}: bad size {size!r}")
    if not isinstance(mode, int) or not isinstance(mtime, int | float):
        raise EntryRefused(f"{path}: bad mode or mtime")
    target = payload.get("target", "")
    if kind == "symlink":
        check_link_target(path, target if isinstance(target, str) else "")
    return Header(path=path, kind=kind, size=size, mode=mode & MODE_BITS, mtime=float(mtime),
                  target=target if kind == "symlink" else "")


def parse_end(payload: object) -> tuple[int, str]:
    if not isinstance(payload, dict) or not isinstance(payload.get("size"), int) \
            or not isinstance(payload.get("sha256"), str):
        raise EntryRefused("malformed end of file")
    return payload["size"], payload["sha256"]


@dataclass
class Manifest:
    """What a copy moved: per file its digest, and one digest over the whole list."""

    files: int = 0
    bytes: int = 0
    entries: list[tuple[str, str, int, str]] = field(default_factory=list)
    kept: int = 1000  # per-file lines kept for the audit; the digest covers them all

    def add(self, path: str, kind: str, size: int, digest: str) -> None:
        self.files += 1
        self.bytes += size
        self.entries.append((path, kind, size, digest))

    def digest(self) -> str:
        h = hashlib.sha256()
        for path, kind, size, digest in sorted(self.entries):
            h.update(f"{kind} {size} {digest} {path}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes, "manifest_sha256": self.digest(),
                "sha256": {p: d for p, k, _, d in self.entries[:self.kept] if k == "file"}}
