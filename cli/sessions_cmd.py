"""`rune sessions list|replay|kill`: live and recorded sessions, for operators."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Annotated, Optional

import typer
from rune.cli.audit_cmd import render
from rune.cli.common import (
    AllNamespacesOption,
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


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def list_command(
    namespace: NamespaceOption = None,
    all_namespaces: AllNamespacesOption = False,
    api_server: ApiServerOption = None, token_file: TokenFileOption = None,
    ca_file: CaFileOption = None, context: ContextOption = None,
) -> Job:
    """Active sessions and recorded (finished TTY) sessions, oldest first."""
    connection = Connection(api_server, token_file, ca_file, context)
    chosen = namespace_of(current(), namespace, connection)

    async def listing(inv: Invocation) -> int:
        async with connect(inv, connection) as client:
            sessions = await client.list_sessions(chosen, all_namespaces)
        rows = [("SESSION", "STATE", "USER", "NAMESPACE", "INSTANCE", "STARTED", "DURATION",
                 "RESULT", "COMMAND")]
        for s in sessions:
            result = "-" if s.state == "active" else (
                f"signal {s.signal}" if s.signal else f"exit {s.exit_code}" if s.exited
                else "failed")
            rows.append((s.session_id, s.state, s.user, s.namespace, s.instance_id,
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.started)),
                         _duration(s.duration), result, " ".join(s.command)))
        inv.out.write("\n".join(render(rows)) + "\n")
        return 0

    return Job(listing)


def cast_events(text: str) -> tuple[dict, list[tuple[float, str, str]]]:
    """Parses asciicast v2 text into its header and (time, code, data) events."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("empty recording")
    header = json.loads(lines[0])
    events = []
    for line in lines[1:]:
        t, code, data = json.loads(line)
        events.append((float(t), code, data))
    return header, events


def play(events: list[tuple[float, str, str]], speed: float, idle_limit: float | None,
         out: int = 1, sleep: object = time.sleep) -> None:
    """Writes output events to `out` at their recorded pace (divided by `speed`)."""
    previous = 0.0
    for t, code, data in events:
        wait = max(0.0, t - previous)
        if idle_limit is not None:
            wait = min(wait, idle_limit)
        previous = t
        if wait > 0:
            sleep(wait / speed)
        if code == "o":
            view = memoryview(data.encode("utf-8", "surrogateescape"))
            while view:
                view = view[os.write(out, view):]


def replay_command(
    session_id: Annotated[str, typer.Argument(
        metavar="SESSION", help="session id (see `rune sessions list`)", show_default=False)],
    speed: Annotated[float, typer.Option(metavar="FACTOR", help="playback speed factor")]
    = 1.0,
    idle_limit: Annotated[Optional[float], typer.Option(  # noqa: UP045
        metavar="SECONDS", help="cap on any pause, in seconds")] = None,
    cast: Annotated[bool, typer.Option("--cast", help="print the asciicast v2 file instead")]
    = False,
    api_server: ApiServerOption = None, token_file: TokenFileOption = None,
    ca_file: CaFileOption = None, context: ContextOption = None,
) -> Job:
    """Replay a recorded TTY session in real time (or --speed N times faster)."""
    if speed <= 0:
        raise typer.BadParameter("must be positive", param_hint="--speed")
    connection = Connection(api_server, token_file, ca_file, context)

    async def fetch(inv: Invocation) -> int:
        data = bytearray()
        async with connect(inv, connection) as client:
            async for chunk in client.replay_session(session_id):
                data += chunk.data
        if cast:
            inv.out_bytes.write(bytes(data))
            inv.out_bytes.flush()
            return 0
        _header, events = cast_events(data.decode())
        # Paced writes sleep: off the event loop, which the multiplexer shares.
        await asyncio.get_running_loop().run_in_executor(
            None, play, events, speed, idle_limit, inv.stdout)
        return 0

    return Job(fetch)


def kill_command(
    session_id: Annotated[str, typer.Argument(
        metavar="SESSION", help="id of an active session", show_default=False)],
    reason: Annotated[str, typer.Option(metavar="TEXT", help="told to the session's user")]
    = "",
    api_server: ApiServerOption = None, token_file: TokenFileOption = None,
    ca_file: CaFileOption = None, context: ContextOption = None,
) -> Job:
    """End an active session and kill its command (verb `admin`)."""
    connection = Connection(api_server, token_file, ca_file, context)

    async def kill(inv: Invocation) -> int:
        async with connect(inv, connection) as client:
            await client.kill_session(session_id, reason)
        inv.out.write(f"session {session_id} killed\n")
        return 0

    return Job(kill)
