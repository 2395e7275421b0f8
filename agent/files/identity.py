"""Doing file I/O as an instance's user: fsuid, fsgid and groups of one thread only.

setfsuid/setfsgid and the raw setgroups syscall change the calling thread alone (glibc's
setgroups() would change every thread of the agent). Leaving fsuid 0 also drops the
thread's file capabilities (CAP_DAC_OVERRIDE, CAP_CHOWN, CAP_FOWNER, ...), so the kernel
checks every open, create and rename against that user, as it would for the instance.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159}.get(platform.machine())


@dataclass(frozen=True)
class FileIdentity:
    uid: int
    gid: int
    groups: tuple[int, ...] = field(default_factory=tuple)

    def applies(self) -> bool:
        return (self.uid, self.gid) != (os.geteuid(), os.getegid())


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def thread_setup(identity: FileIdentity | None) -> Callable[[], None] | None:
    """An initializer for the copy's worker thread; None when no switch is needed."""
    if identity is None or not identity.applies():
        return None
    if os.geteuid() != 0:
        raise PermissionError(f"the agent cannot act as uid {identity.uid}: it is not root")
    if _SYS_SETGROUPS is None:
        raise OSError(f"no per-thread setgroups on {platform.machine()}")

    def setup() -> None:
        groups = (ctypes.c_uint * max(len(identity.groups), 1))(*identity.groups)
        _check(_libc.syscall(_SYS_SETGROUPS, len(identity.groups), groups), "setgroups")
        _libc.setfsgid(identity.gid)
        _libc.setfsuid(identity.uid)
        # setfs*id() report the previous id, never an error: read back to be sure.
        if _libc.setfsuid(identity.uid) != identity.uid or \
                _libc.setfsgid(identity.gid) != identity.gid:
            raise OSError(f"cannot act as uid {identity.uid} gid {identity.gid}")

    return setup
