"""A service's private view of the host: paths hidden in a mount namespace of its own.

A service with `isolation: {hide_paths: [...]}` starts, and every exec into it starts, in
a new mount namespace where each listed directory is covered by an empty read-only tmpfs
and each listed file by /dev/null. The instance's own working directory stays visible
even when it lies under a hidden path (it is bound back in through a descriptor opened
before the cover went on). The view is built the same way for the instance and for
each exec, from the same spec, rather than by joining the instance's process: so an exec
never depends on the instance's pid (restarts, reuse) and never enters namespaces the
instance may have made itself.

An agent that is root makes the mount namespace directly and then drops to the instance
user, who has no capability to unmount anything. An agent that is not root has no second
uid: it makes a user namespace first, mapping only its own uid and gid onto themselves
(never onto root), so after execve the command holds no capability in it; a namespace
the command makes itself is less privileged, and the covers come into it locked (the
kernel refuses to unmount them there). Without unprivileged user namespaces (sysctls
kernel.unprivileged_userns_clone=0, user.max_user_namespaces=0, or
kernel.apparmor_restrict_unprivileged_userns=1) probe() says so and the agent refuses to
start such a service rather than expose what it should hide.

Everything here but probe() runs in the forked child before it drops privileges.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from rune.errors import RuneError

_LIBC = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_COVER_FLAGS = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
SYSCTL_HINT = ("unprivileged user namespaces are unavailable (check the sysctls "
               "kernel.unprivileged_userns_clone, user.max_user_namespaces and "
               "kernel.apparmor_restrict_unprivileged_userns)")


class IsolationUnavailable(RuneError):
    """A service's paths cannot be hidden here (no namespaces for this agent)."""


@dataclass(frozen=True)
class Isolation:
    """What to hide, and the one directory under it that stays (the instance's own)."""

    hide_paths: tuple[str, ...]
    keep: str | None = None

    def enter(self) -> None:
        """Moves the calling (single-threaded, forked) process into its private view."""
        keep = os.path.realpath(self.keep) if self.keep else None
        _new_namespaces()
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing goes back to the host
        # Opened in the new namespace (a bind takes its source from there), before covers.
        keep_fd = _open_path(keep) if keep else None
        try:
            for path in _outermost(self.hide_paths):
                _cover(path, keep, keep_fd)
        finally:
            if keep_fd is not None:
                os.close(keep_fd)


def _syscall_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def _new_namespaces() -> None:
    if os.geteuid() == 0:
        if _LIBC.unshare(_CLONE_NEWNS) != 0:
            raise _syscall_error("unshare(mount namespace)")
        return
    uid, gid = os.geteuid(), os.getegid()
    if _LIBC.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{SYSCTL_HINT}: {os.strerror(code)}")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    if _LIBC.mount(_c(source), _c(target), _c(fstype), flags, _c(data)) != 0:
        raise _syscall_error(f"mount on {target}")


def _c(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def _open_path(path: str) -> int | None:
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None  # a missing workdir is reported later, by chdir, as that user


def _outermost(paths: Iterable[str]) -> list[str]:
    """Existing paths, each once, none inside another one already covered."""
    chosen: list[str] = []
    for path in sorted({os.path.realpath(p) for p in paths}):
        if os.path.lexists(path) and not any(_inside(path, c) for c in chosen):
            chosen.append(path)
    return chosen


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _cover(path: str, keep: str | None, keep_fd: int | None) -> None:
    if not stat.S_ISDIR(os.stat(path).st_mode):
        _mount("/dev/null", path, None, _MS_BIND)
        _mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _COVER_FLAGS)
        return
    if keep == path:
        return  # the instance's own directory is never hidden from it
    _mount("rune-hidden", path, "tmpfs", _COVER_FLAGS, "mode=0755,size=64k,nr_inodes=256")
    if keep is not None and keep_fd is not None and _inside(keep, path):
        os.makedirs(keep, mode=0o755, exist_ok=True)  # inside the new tmpfs
        _mount(f"/proc/self/fd/{keep_fd}", keep, None, _MS_BIND)
    _mount(None, path, None, _MS_REMOUNT | _MS_RDONLY | _COVER_FLAGS)


def probe(isolation: Isolation) -> None:
    """Builds the view once in a throwaway child; OSError says why it cannot be built."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_fd)
            isolation.enter()
            os._exit(0)
        except BaseException as exc:  # noqa: BLE001 - the child must never return
            try:
                text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                os.write(write_fd, text.encode()[:1024])
            finally:
                os._exit(1)
    os.close(write_fd)
    try:
        message = b""
        while chunk := os.read(read_fd, 1024):
            message += chunk
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        text = message.decode(errors="replace") or "the isolation probe failed"
        raise OSError(errno.EPERM, text)
