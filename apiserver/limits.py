"""The concurrent-session limits per user and per agent."""

from __future__ import annotations

from collections import Counter

from rune.apiserver.config import LimitsConfig

from rune.errors import ResourceExhausted


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
