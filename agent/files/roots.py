"""Where an instance's files are and whose they are: the root and user a copy acts in.

A process instance: the host's `/`, as the service's `user` (the agent's own when none).
A container: the root of its init process (`/proc/<pid>/root`), as the container's
configured user (numeric, or a name looked up in the container's own /etc/passwd,
read inside that root). Relative paths are relative to the instance's working dir.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from rune.agent.files.identity import FileIdentity

from rune.errors import NotFound, NotRunning, PermissionDenied, Unavailable
from rune.files.safepath import SafeRoot
from rune.models import InstanceInfo


@dataclass
class InstanceFiles:
    root: SafeRoot
    identity: FileIdentity | None
    workdir: str

    def path(self, path: str) -> str:
        return path if path.startswith("/") else f"{self.workdir.rstrip('/')}/{path}"


def process_files(context: object | None, instance: InstanceInfo) -> InstanceFiles:
    if context is None:
        raise NotFound(f"instance {instance.instance_id} is not supervised by this agent")
    if context.isolation is not None:  # the copy would act outside its covers
        raise PermissionDenied(f"instance {instance.instance_id} hides paths of the host "
                               "(isolation: hide_paths), which rune cp cannot honour")
    account = context.account
    identity = FileIdentity(account.uid, account.gid, tuple(account.groups))
    return InstanceFiles(SafeRoot.at("/"), identity, context.workdir)


def _container_user(root: SafeRoot, spec: str) -> FileIdentity:
    """Config.User as docker reads it: uid[:gid] or name[:group], names from the image."""
    user, _, group = (spec or "0").partition(":")
    passwd = _read_inside(root, "/etc/passwd")
    groups = _read_inside(root, "/etc/group")
    uid = gid = None
    for line in passwd:
        fields = line.split(":")
        if len(fields) >= 4 and (fields[0] == user or fields[2] == user):
            uid, gid = int(fields[2]), int(fields[3])
            break
    if uid is None:
        if not user.isdigit():
            raise NotFound(f"user {user!r} of the container is not in its /etc/passwd")
        uid, gid = int(user), 0 if not group else None
    if group:
        gid = int(group) if group.isdigit() else next(
            (int(f[2]) for f in (g.split(":") for g in groups) if len(f) >= 3 and f[0] == group),
            None)
        if gid is None:
            raise NotFound(f"group {group!r} of the container is not in its /etc/group")
    return FileIdentity(uid, gid or 0, (gid or 0,))


def _read_inside(root: SafeRoot, path: str) -> list[str]:
    try:
        fd = root.open(path, os.O_RDONLY)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        return f.read(4 * 1024 * 1024).decode("utf-8", "replace").splitlines()


async def container_files(runner: object, instance: InstanceInfo) -> InstanceFiles:
    cid = runner.containers.get(instance.key)
    if cid is None:
        raise NotFound(f"instance {instance.instance_id} is not a container of this agent")
    try:
        info = await asyncio.to_thread(runner.client.inspect_container, cid)
    except Exception as exc:
        raise Unavailable(f"docker engine: {exc}") from exc
    pid = (info.get("State") or {}).get("Pid") or 0
    if not pid:
        raise NotRunning(f"instance {instance.instance_id} is not running")
    config = info.get("Config") or {}
    root = await asyncio.to_thread(SafeRoot.at, f"/proc/{pid}/root")
    try:
        # The pid may have been reused between the inspect and the open: the container
        # must still run with it, else the root is someone else's.
        again = await asyncio.to_thread(runner.client.inspect_container, cid)
        if (again.get("State") or {}).get("Pid") != pid:
            raise NotRunning(f"instance {instance.instance_id} restarted; try again")
        identity = await asyncio.to_thread(_container_user, root, config.get("User") or "")
    except BaseException:
        root.close()
        raise
    return InstanceFiles(root, identity, config.get("WorkingDir") or "/")
