"""The concurrent-session limits per user and per agent."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from rune.apiserver.config import LimitsConfig

from rune.errors import ResourceExhausted


class SessionLimits:
    """Counts live sessions per user and per agent; refuses past the maxima (0 = no limit)."""

    def __init__(self, limits: LimitsConfig,
                 elsewhere: Callable[[str, str], tuple[int, int]] | None = None) -> None:
        self.limits = limits
        self.per_user: Counter[str] = Counter()
        self.per_agent: Counter[str] = Counter()
        # The sessions other apiservers run for a user and on an agent (apiserver/peers.py).
        self.elsewhere = elsewhere

    def room(self, user: str) -> int | None:
        """How many more sessions `user` may open now; None without a per-user cap."""
        cap = self.limits.max_sessions_per_user
        if not cap:
            return None
        users = (self.elsewhere(user, "")[0] if self.elsewhere else 0) + self.per_user[user]
        return max(0, cap - users)

    def acquire(self, user: str, agent: str) -> None:
        """Counts one more session of `user` on `agent` ("" for one that loads no agent)."""
        cap_user, cap_agent = self.limits.max_sessions_per_user, self.limits.max_sessions_per_agent
        users, agents = self.elsewhere(user, agent) if self.elsewhere else (0, 0)
        users += self.per_user[user]
        agents += self.per_agent[agent]
        if cap_user and users >= cap_user:
            raise ResourceExhausted(f'too many sessions: user "{user}" already has '
                                    f"{users} (the maximum)")
        if cap_agent and agent and agents >= cap_agent:
            raise ResourceExhausted(f'too many sessions: host agent "{agent}" already runs '
                                    f"{agents} (the maximum)")
        self.per_user[user] += 1
        if agent:
            self.per_agent[agent] += 1

    def release(self, user: str, agent: str) -> None:
        self.per_user[user] -= 1
        if agent:
            self.per_agent[agent] -= 1
