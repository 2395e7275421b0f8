"""Starts a command as an instance's user: privileges first, then the directory, then argv[0].

The child is forked by us, not by subprocess, so that every step after the fork is ours
and in this order:

    setsid (and the controlling terminal)  ->  stdio  ->  isolation (agent/isolation.py)
    ->  setgroups, setgid, setuid
    ->  parent-death signal  ->  chdir(workdir)  ->  resolve argv[0]  ->  execve

Everything from the user switch on is decided as the instance's user, so a directory or a
binary that user cannot reach fails as it would for them (126/127, permission denied),
and root never looks anywhere on the caller's behalf. A failure is written to a report
pipe (close-on-exec, so a successful exec closes it with no bytes) and the child leaves
with os._exit whatever happens: it never returns into the agent's code.

The same child is also written in C (agent/runners/_vspawn.c, built when a compiler is
there) and started by vfork: a fork copies the agent's page tables and faults its heap in,
several milliseconds per child that grow with the agent, where a vfork costs ~0.3 ms.
fork_child uses it when it is built and the plan has no isolation; RUNE_SPAWN=fork chooses
the Python child.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import json
import os
import signal
import struct
import termios
from dataclasses import dataclass

from rune.agent.account import Account
from rune.agent.isolation import Isolation
from rune.agent.runners.base import CommandUnavailable, resolve_executable

from rune.errors import Internal

try:
    from rune.agent.runners import _vspawn
except ImportError:  # built without a C compiler: the Python child below does it all
    _vspawn = None

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_REPORT_LIMIT = 4096
# Signals the agent's Python runtime ignores or handles; a command starts with defaults.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                  signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGWINCH,
                  signal.SIGUSR1, signal.SIGUSR2, signal.SIGTSTP, signal.SIGTTIN,
                  signal.SIGTTOU)


@dataclass(frozen=True)
class ChildPlan:
    """What the child does once forked."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    account: Account | None = None  # None: stay who the agent is
    die_with: int | None = None  # the agent's pid: the child dies with it
    isolation: Isolation | None = None  # paths hidden from the command


class SpawnFailed(Internal):
    """The child could not become the instance's user (not a 126/127 of the command)."""


def _report(fd: int, kind: str, code: int, message: str) -> None:
    data = json.dumps({"kind": kind, "code": code, "message": message}).encode()
    try:
        os.write(fd, data[:_REPORT_LIMIT])
    except OSError:
        pass


def _drop_privileges(account: Account) -> None:
    os.setgroups(list(account.groups))
    os.setgid(account.gid)
    os.setuid(account.uid)
    if os.getuid() != account.uid or os.geteuid() != account.uid:
        raise PermissionError(f"still uid {os.geteuid()} after setuid({account.uid})")


def _enter(cwd: str) -> None:
    try:
        os.chdir(cwd)
    except FileNotFoundError:
        raise CommandUnavailable(126, f"workdir {cwd}: no such directory") from None
    except NotADirectoryError:
        raise CommandUnavailable(126, f"workdir {cwd}: not a directory") from None
    except PermissionError:
        raise CommandUnavailable(126, f"workdir {cwd}: permission denied") from None


def _exec(plan: ChildPlan) -> None:
    path = resolve_executable(plan.argv[0], plan.env, plan.cwd)
    try:
        os.execve(path, plan.argv, plan.env)
    except FileNotFoundError:  # e.g. a script whose interpreter is missing
        raise CommandUnavailable(127, f'exec: "{plan.argv[0]}": no such file or '
                                      "directory") from None
    except OSError as exc:
        raise CommandUnavailable(126, f'exec: "{plan.argv[0]}": '
                                      f"{os.strerror(exc.errno or 0).lower()}") from None


def _child(plan: ChildPlan, report_fd: int, stdio: tuple[int, int, int],
           terminal: int | None) -> None:
    """Runs in the forked child; never returns (execve or os._exit)."""
    try:
        # Above the stdio slots, so that placing stdio cannot overwrite it.
        report_fd = fcntl.fcntl(report_fd, fcntl.F_DUPFD_CLOEXEC, 3)
        os.setsid()
        if terminal is not None:
            fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)
        for target, source in enumerate(stdio):
            os.dup2(source, target)
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, 1 << 16)
        for signum in _RESET_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        stage = "hide paths"
        try:
            if plan.isolation is not None:
                plan.isolation.enter()
            stage = "switch user"
            if plan.account is not None:
                _drop_privileges(plan.account)
            if plan.die_with:
                # After setuid, which would clear it; the agent may already be gone.
                _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if os.getppid() != plan.die_with:
                    os._exit(255)
            stage = "start"
            _enter(plan.cwd)
            _exec(plan)
        except CommandUnavailable as exc:
            _report(report_fd, "exit", exc.exit_code, str(exc))
            os._exit(exc.exit_code)
        except OSError as exc:
            who = plan.account.name if plan.account else "the agent"
            _report(report_fd, "error", 0, f"cannot {stage} as {who}: {exc.strerror or exc}")
            os._exit(126)
    except BaseException as exc:  # noqa: BLE001 - the child must never return
        _report(report_fd, "error", 0, f"cannot start the command: {exc!r}")
    finally:
        os._exit(126)


def set_winsize(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def fork_child(plan: ChildPlan, stdio: tuple[int, int, int],
               terminal: int | None = None) -> tuple[int, int]:
    """Forks the child on the given stdio descriptors; returns (pid, report pipe)."""
    report_r, report_w = os.pipe()  # close-on-exec both: a successful exec closes it
    try:
        pid = _vfork(plan, stdio, terminal, report_w) if _use_vfork(plan) else os.fork()
    except BaseException:
        os.close(report_r)
        os.close(report_w)
        raise
    if pid == 0:
        _child(plan, report_w, stdio, terminal)
    os.close(report_w)
    return pid, report_r


def _use_vfork(plan: ChildPlan) -> bool:
    # Isolation (agent/isolation.py) is Python run in the child: that child forks.
    return (_vspawn is not None and plan.isolation is None
            and os.environ.get("RUNE_SPAWN") != "fork")


def _vfork(plan: ChildPlan, stdio: tuple[int, int, int], terminal: int | None,
           report_w: int) -> int:
    """The C child of _vspawn.c; a plan it cannot carry (a NUL in argv, a value that is no
    string) fails here as the Python child reports it."""
    try:
        argv = [os.fsencode(a) for a in plan.argv]
        env = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in plan.env.items()]
        path = plan.env.get("PATH")
        account = plan.account
        return _vspawn.vspawn(
            argv, env, os.fsencode(plan.cwd), None if path is None else os.fsencode(path),
            (account.name if account else "the agent").encode(errors="replace"),
            account is not None, account.uid if account else 0,
            account.gid if account else 0, list(account.groups) if account else [],
            plan.die_with or 0, stdio, -1 if terminal is None else terminal, report_w)
    except (TypeError, ValueError) as exc:
        raise SpawnFailed(f"cannot start the command: {exc!r}") from None


async def readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Until fd can be read without blocking."""
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def read_report(fd: int) -> dict | None:
    """The child's failure report, or None once its exec closed the pipe empty."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(fd, _REPORT_LIMIT)
            except BlockingIOError:
                await readable(loop, fd)
                continue
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
    if not chunks:
        return None
    try:
        report = json.loads(b"".join(chunks)[:_REPORT_LIMIT])
    except ValueError:
        return {"kind": "error", "code": 0, "message": "the command's start failed"}
    return report if isinstance(report, dict) else None


def raise_report(report: dict) -> None:
    """Turns a child's report into what the runner raises."""
    message = str(report.get("message", ""))[:1024]
    code = report.get("code")
    if report.get("kind") == "exit" and code in (126, 127):
        raise CommandUnavailable(code, message)
    raise SpawnFailed(message or "the command could not be started")
