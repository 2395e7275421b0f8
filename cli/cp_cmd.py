"""`rune cp [OPTIONS] SRC... DEST`: files to and from instances, one side remote.

The remote side is written TARGET:PATH (a service or an instance id; `-n` for the
namespace), as scp does: a colon before any slash. `-` as the only SRC reads stdin into
one remote file; `-` as DEST writes one remote file to stdout. Exit 0, 1 when a file
could not be read or written (one `Error: …` line each), 255 for rune's own failures,
2 for bad flags.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Optional

import typer
from rune.cli.common import (
    ApiServerOption,
    CaFileOption,
    Connection,
    ContextOption,
    Job,
    NamespaceOption,
    TokenFileOption,
    connect,
    current,
    namespace_of,
)
from rune.cli.invocation import Invocation

CHOWN = re.compile(r"[0-9]{1,10}:[0-9]{1,10}")


def split_remote(arg: str) -> tuple[str, str] | None:
    """(target, path) for TARGET:PATH; None for a local path."""
    head, sep, path = arg.partition(":")
    if not sep or not head or "/" in head:
        return None
    return head, path


def plan_from_args(args: list[str], namespace: str, recursive: bool, follow: bool,
                   preserve: bool, chown: str, timeout: float, fanout: bool) -> object:
    from rune.cli.cp_stream import CopyPlan, absolute

    if len(args) < 2:
        raise typer.BadParameter("need at least one SRC and a DEST", param_hint="SRC... DEST")
    *sources, dest = args
    remote_dest = split_remote(dest)
    remote_sources = [split_remote(s) for s in sources]
    if remote_dest is not None:
        if any(r is not None for r in remote_sources):
            raise typer.BadParameter("exactly one side may be remote (TARGET:PATH)")
        if "-" in sources and len(sources) > 1:
            raise typer.BadParameter("'-' (stdin) must be the only SRC")
        target, path = remote_dest
        if not path:
            raise typer.BadParameter("the remote DEST needs a path (TARGET:PATH)")
        return CopyPlan(target, namespace, True, [absolute(s) for s in sources], path,
                        recursive, follow, preserve, chown, timeout, fanout)
    if any(r is None for r in remote_sources):
        raise typer.BadParameter("one side must be remote (TARGET:PATH), and all sources "
                                 "on the same side")
    targets = {r[0] for r in remote_sources}
    if len(targets) > 1:
        raise typer.BadParameter("all remote sources must be on one TARGET")
    if any(not r[1] for r in remote_sources):
        raise typer.BadParameter("a remote SRC needs a path (TARGET:PATH)")
    if dest == "-" and (len(sources) > 1 or fanout):
        raise typer.BadParameter("'-' (stdout) takes exactly one remote file")
    if chown:
        raise typer.BadParameter("--chown applies to uploads only", param_hint="--chown")
    return CopyPlan(targets.pop(), namespace, False, [r[1] for r in remote_sources],
                    absolute(dest), recursive, follow, preserve, "", timeout, fanout)


def cp_command(
    paths: Annotated[list[str], typer.Argument(help="SRC... DEST; one side TARGET:PATH",
                                               metavar="SRC... DEST")],
    namespace: NamespaceOption = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", "-R",
                                            help="copy directories")] = False,
    follow: Annotated[bool, typer.Option("--dereference", "-L",
                                         help="follow symlinks (default: copy links "
                                         "as links)")] = False,
    preserve: Annotated[bool, typer.Option("--preserve", "-p",
                                           help="keep times too (modes are always "
                                           "kept)")] = False,
    chown: Annotated[str, typer.Option(help="uid:gid of what is written (where "
                                       "policy allows)")] = "",
    progress: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--progress/--no-progress", help="bytes, rate, ETA (auto on a terminal)")] = None,
    timeout: Annotated[str, typer.Option(help="e.g. 30s, 5m, 1h")] = "1h",
    all_: Annotated[bool, typer.Option("--all", help="every running instance of "
                                       "TARGET")] = False,
    api_server: ApiServerOption = None,
    token_file: TokenFileOption = None,
    ca_file: CaFileOption = None,
    context: ContextOption = None,
) -> Job:
    """Copy files to or from instances: rune cp ./conf.yaml api:/srv/app/"""
    from rune.cli.parsing import parse_duration

    try:
        timeout_seconds = parse_duration(timeout)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--timeout") from None
    if chown and not CHOWN.fullmatch(chown):
        raise typer.BadParameter("must be numeric uid:gid", param_hint="--chown")
    connection = Connection(api_server, token_file, ca_file, context)
    plan = plan_from_args(paths, namespace_of(current(), namespace, connection), recursive,
                          follow, preserve, chown, timeout_seconds, all_)

    async def copy(inv: Invocation) -> int:
        from rune.cli.cp_progress import CopyProgress, wanted
        from rune.cli.cp_stream import CopyCall, exit_code, stderr_report
        from rune.cli.fanout_output import summary

        from rune.heap import keep_freed_buffers

        keep_freed_buffers()

        bar = CopyProgress(wanted(progress) and plan.dest != "-",
                           "upload" if plan.upload else "download")
        async with connect(inv, connection) as client:
            call = CopyCall(client, plan, stderr_report, bar)
            try:
                results = await call.run()
            finally:
                bar.close()
                call.close()
        if plan.fanout:
            os.write(2, summary(results).encode())
        elif results and results[0].status != "exited":
            stderr_report(results[0].error)
        return exit_code(results, call.local_failures)

    # Not through the multiplexer (rune.cli.entry): it reads and writes local files here.
    return Job(copy, error_prefix="failed to copy")
