"""Fan-out rollout terms shared by the CLI and the apiserver: member statuses and amounts.

A member of a fan-out ends with exactly one MemberStatus. `exited` carries the
command's exit code; every other status means the command did not run to its end:

    exited       the command ran and exited (any code or signal)
    failed       refused or broken before or while running (policy, limits, agent error)
    unreachable  its agent did not answer or was lost
    timed_out    its own --timeout, or the run's --job-timeout, ran out
    killed       an operator ended it (`rune sessions kill`)
    skipped      never started: --max-fail exceeded, a canary failed, or the job timed out
    cancelled    stopped by --fail-fast
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from rune.errors import InvalidArgument


class MemberStatus(StrEnum):
    EXITED = "exited"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    TIMED_OUT = "timed_out"
    KILLED = "killed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


NEVER_RAN = frozenset((MemberStatus.SKIPPED, MemberStatus.CANCELLED))


@dataclass(frozen=True)
class Amount:
    """`N` members, or `N%` of the targeted ones (rounded up, at least 1)."""

    value: int
    percent: bool = False

    @classmethod
    def parse(cls, text: str, what: str, zero_ok: bool = False) -> Amount | None:
        """None for an empty text; InvalidArgument naming `what` for a bad one."""
        text = text.strip()
        if not text:
            return None
        percent = text.endswith("%")
        digits = text[:-1] if percent else text
        if not digits.isdigit() or len(digits) > 9:
            raise InvalidArgument(f"{what} {text!r} must be N or N%")
        value = int(digits)
        if (value == 0 and not zero_ok) or (percent and value > 100):
            low = 0 if zero_ok else 1
            raise InvalidArgument(f"{what} {text!r} must be {low}-100% or a count >= {low}")
        return cls(value, percent)

    def of(self, total: int) -> int:
        if not self.percent:
            return self.value
        return max(1, math.ceil(total * self.value / 100)) if self.value else 0

    def __str__(self) -> str:
        return f"{self.value}%" if self.percent else str(self.value)
