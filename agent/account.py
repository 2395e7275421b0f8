"""The OS account an instance runs as: who, its groups and home, and whether to switch."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @classmethod
    def of(cls, user: str | None) -> Account:
        """The named user (or the agent's own when None); KeyError when there is none."""
        if user is None:
            uid = os.geteuid()
            try:
                entry = pwd.getpwuid(uid)
            except KeyError:
                return cls(str(uid), uid, os.getegid(), tuple(os.getgroups()), "/")
        else:
            entry = pwd.getpwnam(user)
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir or "/")

    @property
    def switch(self) -> Account | None:
        """Self to switch to, or None when the agent already is this user or cannot switch
        (an agent that is not root runs everything as itself)."""
        if os.geteuid() != 0 or self.uid == os.geteuid():
            return None
        return self
