"""The small interface every runner implements, and what the runners share."""

from __future__ import annotations

import os
import signal as signals
from typing import Protocol

from rune.models import ExecOpen, InstanceInfo


class CommandUnavailable(Exception):
    """The command cannot be started: 127 when missing, 126 when not executable."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Execution(Protocol):
    """One running command; reads return b'' at EOF."""

    tty: bool

    async def read_stdout(self, n: int) -> bytes: ...

    async def read_stderr(self, n: int) -> bytes: ...

    async def write_stdin(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...

    def resize(self, width: int, height: int) -> None: ...

    def signal(self, signum: int) -> None: ...

    async def wait(self) -> tuple[int, int]:
        """(exit code, signal): a signal death gives (128 + N, N)."""
        ...

    async def terminate(self, grace: float) -> None:
        """Hang up (or SIGTERM), then SIGKILL what is left after `grace` seconds."""
        ...

    async def kill(self) -> None: ...

    def close(self) -> None: ...


class Runner(Protocol):
    name: str

    async def exec(self, instance: InstanceInfo, request: ExecOpen) -> Execution: ...


def status_from_returncode(returncode: int) -> tuple[int, int]:
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, 0


def wait_status_to_exit(status: int) -> tuple[int, int]:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.WEXITSTATUS(status), 0


def resolve_executable(command: str, env: dict[str, str], cwd: str) -> str:
    """Finds argv[0] as execvp would, telling 'missing' (127) from 'not executable' (126)."""
    if "/" in command:
        path = command if os.path.isabs(command) else os.path.join(cwd, command)
        if not os.path.exists(path):
            raise CommandUnavailable(127, f'exec: "{command}": no such file or directory')
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise CommandUnavailable(126, f'exec: "{command}": permission denied')
        return path
    found_unexecutable = False
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", command)
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return path
            found_unexecutable = True
    if found_unexecutable:
        raise CommandUnavailable(126, f'exec: "{command}": permission denied')
    raise CommandUnavailable(127, f'exec: "{command}": executable file not found in $PATH')


def signal_name(signum: int) -> str:
    try:
        return signals.Signals(signum).name
    except ValueError:
        return str(signum)
