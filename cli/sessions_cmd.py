"""`rune sessions list|replay|kill`: live and recorded sessions, for operators."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated, Optional

import typer
from rune.cli.audit_cmd import render

sessions_app = typer.Typer(add_completion=False, no_args_is_help=True,
                           help="List, replay and kill sessions (verbs audit / admin).")
ApiServer = Annotated[Optional[str], typer.Option(help="host:port")]  # noqa: UP045
TokenFile = Annotated[Optional[str], typer.Option()]  # noqa: UP045
CaFile = Annotated[Optional[str], typer.Option()]  # noqa: UP045


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


async def _call(client: object, coro: object) -> object:
    import grpc

    try:
        return await coro
    except grpc.aio.AioRpcError as exc:
        raise client.translate(exc) from None


@sessions_app.command("list")
def list_command(
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n")] = None,  # noqa: UP045
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A")] = False,
    api_server: ApiServer = None, token_file: TokenFile = None, ca_file: CaFile = None,
) -> None:
    """Active sessions and recorded (finished TTY) sessions, oldest first."""
    from rune.cli.main import _client, _run
    from rune.cli.settings import load_user_config

    from rune.proto import exec_pb2 as pb

    config = load_user_config()

    async def listing() -> int:
        async with _client(api_server, token_file, ca_file) as client:
            reply = await _call(client, client.stub.ListSessions(pb.ListSessionsRequest(
                namespace=namespace or config.namespace or "default",
                all_namespaces=all_namespaces), metadata=client.metadata, timeout=30))
        rows = [("SESSION", "STATE", "USER", "NAMESPACE", "INSTANCE", "STARTED", "DURATION",
                 "RESULT", "COMMAND")]
        for s in reply.sessions:
            result = "-" if s.state == "active" else (
                f"signal {s.signal}" if s.signal else f"exit {s.exit_code}" if s.exited
                else "failed")
            rows.append((s.session_id, s.state, s.user, s.namespace, s.instance_id,
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.started)),
                         _duration(s.duration), result, " ".join(s.command)))
        print("\n".join(render(rows)))
        return 0

    raise typer.Exit(_run(listing()))


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


@sessions_app.command("replay")
def replay_command(
    session_id: Annotated[str, typer.Argument(help="session id (see `rune sessions list`)")],
    speed: Annotated[float, typer.Option(help="playback speed factor")] = 1.0,
    idle_limit: Annotated[Optional[float], typer.Option(  # noqa: UP045
        help="cap on any pause, in seconds")] = None,
    cast: Annotated[bool, typer.Option("--cast", help="print the asciicast v2 file instead")]
    = False,
    api_server: ApiServer = None, token_file: TokenFile = None, ca_file: CaFile = None,
) -> None:
    """Replay a recorded TTY session in real time (or --speed N times faster)."""
    if speed <= 0:
        raise typer.BadParameter("must be positive", param_hint="--speed")
    from rune.cli.main import _client, _run

    from rune.proto import exec_pb2 as pb

    async def fetch() -> int:
        import grpc

        data = bytearray()
        async with _client(api_server, token_file, ca_file) as client:
            call = client.stub.ReplaySession(pb.ReplayRequest(session_id=session_id),
                                             metadata=client.metadata)
            try:
                async for chunk in call:
                    data += chunk.data
            except grpc.aio.AioRpcError as exc:
                raise client.translate(exc) from None
        if cast:
            sys.stdout.buffer.write(bytes(data))
            sys.stdout.flush()
            return 0
        _header, events = cast_events(data.decode())
        play(events, speed, idle_limit)
        return 0

    raise typer.Exit(_run(fetch()))


@sessions_app.command("kill")
def kill_command(
    session_id: Annotated[str, typer.Argument(help="id of an active session")],
    reason: Annotated[str, typer.Option(help="told to the session's user")] = "",
    api_server: ApiServer = None, token_file: TokenFile = None, ca_file: CaFile = None,
) -> None:
    """End an active session and kill its command (verb `admin`)."""
    from rune.cli.main import _client, _run

    from rune.proto import exec_pb2 as pb

    async def kill() -> int:
        async with _client(api_server, token_file, ca_file) as client:
            await _call(client, client.stub.KillSession(pb.KillSessionRequest(
                session_id=session_id, reason=reason), metadata=client.metadata, timeout=30))
        print(f"session {session_id} killed")
        return 0

    raise typer.Exit(_run(kill()))
