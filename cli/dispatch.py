"""Runs one invocation: the same entry for the `rune` process and for the multiplexer.

`plan` parses the words with the typer app (help, usage errors and local commands
finish there); `finish` runs the command's Job and turns a failure into one
`Error: …` line and its exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from rune.cli.common import Job
from rune.cli.exec_cmd import EXEC_VALUED_OPTIONS
from rune.cli.invocation import Invocation
from rune.cli.parsing import mark_command_start

# typer 0.2x carries its own copy of click
from typer._click.core import Command
from typer._click.exceptions import ClickException
from typer.exceptions import Abort, Exit

from rune.errors import InvalidArgument, NotFound, NotRunning, PermissionDenied, RuneError

_commands: dict[bool, Command] = {}
_REFUSALS = (NotFound, NotRunning, PermissionDenied, InvalidArgument)


def _command(full: bool) -> Command:
    """The click command tree, built once per process (the multiplexer reuses it)."""
    if full not in _commands:
        import typer.main
        from rune.cli.main import build_app

        _commands[full] = typer.main.get_command(build_app(full))
    return _commands[full]


def _words(argv: list[str]) -> list[str]:
    args = argv[1:] if argv[:1] == ["--no-mux"] else list(argv)
    if args and args[0] == "exec":
        # Everything from COMMAND on is the command's, even words that look like flags.
        return ["exec", *mark_command_start(args[1:], EXEC_VALUED_OPTIONS)]
    return args


def plan(inv: Invocation) -> Job | int:
    """Parses INV's words; a Job to run, or the exit status of what already finished."""
    args = _words(inv.argv)
    command = _command(full=not (args and args[0] == "exec"))
    streams = (contextlib.redirect_stdout(inv.out), contextlib.redirect_stderr(inv.err)) \
        if inv.in_mux else ()
    with contextlib.ExitStack() as stack:
        for stream in streams:
            stack.enter_context(stream)
        try:
            result = command.main(args=args, prog_name="rune", standalone_mode=False, obj=inv)
        except ClickException as exc:
            exc.show(file=inv.err)
            return exc.exit_code
        except Exit as exc:
            return exc.exit_code
        except Abort:
            inv.err.write("Aborted!\n")
            return 1
        finally:
            inv.flush()
    if isinstance(result, Job):
        return result
    return result if isinstance(result, int) else 0


def error_line(inv: Invocation, message: str, code: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        inv.err.write(f"Error: {message}\n")
        inv.err.flush()
    return code


async def finish(job: Job, inv: Invocation) -> int:
    """Runs JOB; a RuneError (or an unreadable file) becomes one error line."""
    try:
        return await job.run(inv)
    except (OSError, ValueError) as exc:
        return error_line(inv, str(exc), 255)
    except RuneError as exc:
        message = str(exc)
        if job.error_prefix and isinstance(exc, _REFUSALS):
            message = f"{job.error_prefix}: {message}"
        return error_line(inv, message, exc.exit_code)
    except Exit as exc:
        return exc.exit_code
    finally:
        inv.flush()


async def execute(inv: Invocation) -> int:
    """Parses and runs INV on the running loop (the multiplexer's way)."""
    planned = plan(inv)
    if isinstance(planned, int):
        return planned
    return await finish(planned, inv)


def run_here(argv: list[str]) -> int:
    """Runs a command in this process: parse, then the Job on a fresh loop."""
    inv = Invocation(argv=argv)
    if os.environ.get("_RUNE_COMPLETE"):
        from rune.cli.completion_cmd import complete_now

        complete_now()
    try:
        planned = plan(inv)
        if isinstance(planned, int):
            return planned
        # Plain asyncio, not uvloop: libuv leaves the shared terminal fds non-blocking,
        # which breaks the user's shell after we exit.
        return asyncio.run(finish(planned, inv))
    except KeyboardInterrupt:
        return error_line(inv, "interrupted", 130)
    finally:
        inv.flush()
        sys.stdout.flush()
        sys.stderr.flush()
