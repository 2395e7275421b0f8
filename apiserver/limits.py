"""Input checks on an exec request and the concurrent-session limits per user and agent."""

from __future__ import annotations

from collections import Counter

from rune.apiserver.config import LimitsConfig

from rune.errors import InvalidArgument, ResourceExhausted
from rune.proto import exec_pb2 as pb


def check_init(init: pb.ExecInit, limits: LimitsConfig) -> None:
    """Refuses argv/env that are too large or carry NUL bytes, and relative workdirs."""
    if len(init.command) > limits.max_argc:
        raise InvalidArgument(f"too many arguments: {len(init.command)} > {limits.max_argc}")
    argv_bytes = sum(len(a.encode()) + 1 for a in init.command)
    if argv_bytes > limits.max_argv_bytes:
        raise InvalidArgument(f"argv too large: {argv_bytes} bytes > {limits.max_argv_bytes}")
    if any("\0" in a for a in init.command):
        raise InvalidArgument("argv contains a NUL byte")
    env_bytes = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in init.env.items())
    if env_bytes > limits.max_env_bytes:
        raise InvalidArgument(f"environment too large: {env_bytes} bytes > "
                              f"{limits.max_env_bytes}")
    for key, value in init.env.items():
        if "\0" in key or "\0" in value:
            raise InvalidArgument("environment contains a NUL byte")
        if not key or "=" in key:
            raise InvalidArgument(f"bad environment variable name {key!r}")
    if init.workdir and not init.workdir.startswith("/"):
        raise InvalidArgument(f"workdir must be an absolute path, not {init.workdir!r}")
    if "\0" in init.workdir:
        raise InvalidArgument("workdir contains a NUL byte")


class SessionLimits:
    """Counts live sessions per user and per agent; refuses past the maxima (0 = no limit)."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.per_user: Counter[str] = Counter()
        self.per_agent: Counter[str] = Counter()

    def acquire(self, user: str, agent: str) -> None:
        cap_user, cap_agent = self.limits.max_sessions_per_user, self.limits.max_sessions_per_agent
        if cap_user and self.per_user[user] >= cap_user:
            raise ResourceExhausted(f'too many sessions: user "{user}" already has '
                                    f"{self.per_user[user]} (the maximum)")
        if cap_agent and self.per_agent[agent] >= cap_agent:
            raise ResourceExhausted(f'too many sessions: host agent "{agent}" already runs '
                                    f"{self.per_agent[agent]} (the maximum)")
        self.per_user[user] += 1
        self.per_agent[agent] += 1

    def release(self, user: str, agent: str) -> None:
        self.per_user[user] -= 1
        self.per_agent[agent] -= 1
