"""The agent as its commands' subreaper: the children it adopts are reaped, its own are not.

A container's exec is started by `runc exec -d` (runc_detached.py): runc leaves once
the command runs, and the command's exit status goes to whoever adopts it. With
PR_SET_CHILD_SUBREAPER that is the agent, so the exit code comes back exactly, as from
any child of the agent's. Being a subreaper also makes the agent the new parent of any
orphan below it (a process instance's double-forked daemon, a command's background
child once the command is gone), and those must not linger as zombies.

The agent reaps its own children itself (process.Child: a pidfd per child, then
waitpid), so the reaper must never take one of those: every child the agent means to
wait for is `own`ed from the moment its PID is known, and everything else that has
exited is reaped here. Exited children are looked at one at a time with
`waitid(P_ALL, WNOWAIT)`; when the one shown is owned, its owner reaps it in a moment and
asks the reaper to look again (`reap_orphans`). A timer looks every REAP_EVERY seconds
in case nothing asks.

Only the agent program turns this on (agent/main.py): in any other process (a test's,
the dev stack's) a subreaper would reap the children of code that knows nothing of it.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Callable

REAP_EVERY = 1.0  # seconds
_PR_SET_CHILD_SUBREAPER = 36
_LIBC = ctypes.CDLL(None, use_errno=True)


class Reaper:
    """The process's one reaper of adopted orphans."""

    def __init__(self) -> None:
        self.enabled = False
        self._owned: set[int] = set()
        self._before: list[Callable[[], None]] = []  # what may own a PID not yet seen
        self._timer: asyncio.TimerHandle | None = None

    def own(self, pid: int) -> None:
        """pid is a child the caller will reap itself."""
        self._owned.add(pid)

    def release(self, pid: int) -> None:
        self._owned.discard(pid)

    def owns(self, pid: int) -> bool:
        return pid in self._owned

    def before_reaping(self, hook: Callable[[], None]) -> None:
        """hook runs before each look, so that a PID learnt but not yet handled is owned."""
        self._before.append(hook)

    def forget_hook(self, hook: Callable[[], None]) -> None:
        if hook in self._before:
            self._before.remove(hook)

    def enable(self) -> None:
        """This process becomes a child subreaper. Called on the agent's event loop."""
        if _LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"PR_SET_CHILD_SUBREAPER: {os.strerror(error)}")
        self.enabled = True
        self._arm()

    def disable(self) -> None:
        _LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        self.enabled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.reap_orphans(force=True)

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(REAP_EVERY, self._tick)

    def _tick(self) -> None:
        self.reap_orphans()
        if self.enabled:
            self._arm()

    def reap_orphans(self, force: bool = False) -> int:
        """Reaps every exited child that nobody owns, up to the first owned one; the
        count reaped."""
        if not (self.enabled or force):
            return 0
        for hook in list(self._before):
            hook()
        reaped = 0
        while True:
            try:
                shown = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return reaped
            if shown is None or not shown.si_pid or shown.si_pid in self._owned:
                return reaped
            try:
                os.waitpid(shown.si_pid, os.WNOHANG)
            except ChildProcessError:
                pass
            reaped += 1


REAPER = Reaper()
