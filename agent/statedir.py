"""The agent's own directory: created private, owned by the agent, never through a link.

Default `/var/lib/rune-agent` for root, `$XDG_STATE_HOME/rune-agent` (or
`~/.local/state/rune-agent`) otherwise; always 0700, and nothing an instance needs lives
in it. Each instance without a `workdir:` gets a directory of its own, 0700 and its
user's, under the instances directory:

    every instance runs as the agent   <state_dir>/instances        0700
    some instance runs as another user <state_dir>-instances        0711
                                       (or `instances_dir:` outside state_dir)

An instance user must traverse the instances directory to reach its own, so that one
directory is 0711 (search, no listing) and holds nothing but the instances' 0700
directories; the state dir itself stays 0700 since no instance passes through it. Every
step opens the next component with O_NOFOLLOW relative to the one before and changes
owners through the open descriptor, so a link planted anywhere in the path is refused
rather than followed, and a directory that someone else owns is refused rather than used.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from rune.errors import RuneError

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class StateDirRefused(RuneError):
    """The state directory is not safe to use (a link, someone else's, not a directory)."""


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/rune-agent"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "rune-agent")


def _open_child(parent_fd: int | None, name: str, shown: str, mode: int,
                owners: tuple[int, ...]) -> int:
    """Makes (if missing) and opens one directory level without following a link."""
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
    except FileExistsError:
        pass
    try:
        fd = os.open(name, _OPEN_DIR, dir_fd=parent_fd)
    except OSError as exc:
        st = _lstat(name, parent_fd)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise StateDirRefused(f"state directory {shown} is a symbolic link; refusing to "
                                  "follow it (remove it, or choose another state_dir)") from None
        raise StateDirRefused(f"state directory {shown} cannot be opened: "
                              f"{exc.strerror or exc}") from None
    st = os.fstat(fd)
    if st.st_uid not in owners:
        os.close(fd)
        raise StateDirRefused(f"state directory {shown} is owned by uid {st.st_uid}, not by "
                              f"the agent (uid {os.geteuid()}); refusing to use it")
    return fd


def _lstat(name: str, parent_fd: int | None) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except OSError:
        return None


def _open_top(path: str, mode: int) -> int:
    """Opens (making it if missing) a top directory of the agent's, `mode` whatever it was."""
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_child(parent_fd, os.path.basename(path), path, mode, (os.geteuid(),))
    finally:
        os.close(parent_fd)
    os.fchmod(fd, mode)
    return fd


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


class StateDir:
    """The opened state directory; hands out instance directories beside or inside it."""

    def __init__(self, path: str, shared: bool, instances_dir: str = "") -> None:
        self.path = os.path.abspath(path)
        self.mode = 0o700
        self.instances_mode = 0o711 if shared else 0o700
        if instances_dir:
            self.instances_path = os.path.abspath(instances_dir)
        else:
            self.instances_path = self.path + ("-instances" if shared else "/instances")
        if shared and _inside(self.instances_path, self.path):
            raise StateDirRefused(f"instances_dir {self.instances_path} is inside state_dir "
                                  f"{self.path}, which is 0700: an instance running as "
                                  "another user could not reach its directory; put it "
                                  "outside")
        self._fd = _open_top(self.path, self.mode)
        if _inside(self.instances_path, self.path):
            self._instances = self._open_inside(os.path.relpath(self.instances_path,
                                                                self.path))
        else:
            self._instances = _open_top(self.instances_path, self.instances_mode)

    def _open_inside(self, relative: str) -> int:
        fd = os.dup(self._fd)
        shown = self.path
        for name in relative.split("/"):
            shown = f"{shown}/{name}"
            try:
                child = _open_child(fd, name, shown, self.instances_mode, (os.geteuid(),))
            finally:
                os.close(fd)
            os.fchmod(child, self.instances_mode)
            fd = child
        return fd

    def instance_dir(self, instance_id: str, uid: int | None, gid: int | None) -> str:
        """`<instances>/<id>`, 0700, owned by the instance's user (uid None: the agent)."""
        shown = f"{self.instances_path}/{instance_id}"
        owners = (os.geteuid(),) if uid is None else (os.geteuid(), uid)
        fd = _open_child(self._instances, instance_id, shown, 0o700, owners)
        try:
            if uid is not None:
                os.fchown(fd, uid, gid if gid is not None else -1)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        return shown

    def close(self) -> None:
        for fd in (self._instances, self._fd):
            try:
                os.close(fd)
            except OSError:
                pass
