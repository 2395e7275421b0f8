"""`rune audit`: who ran what, where, when and with what result, from the audit stream."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

COLUMNS = ("TIME", "EVENT", "USER", "NAMESPACE", "INSTANCE", "RESULT", "COMMAND")
FOLLOW_WIDTHS = (19, 7, 12, 10, 24, 24)


def parse_since(text: str) -> float:
    """'90s', '15m', '1h', '2d' → seconds (days added to the exec duration syntax)."""
    from rune.cli.parsing import parse_duration

    if text.strip().endswith("d") and text.strip()[:-1].replace(".", "", 1).isdigit():
        return float(text.strip()[:-1]) * 86400
    return parse_duration(text)


def result_text(event: dict) -> str:
    if event.get("event") == "session.ended":
        if event.get("signal"):
            return f"signal {event['signal']}"
        return f"exit {event.get('exit_code')}"
    if event.get("event") == "session.started":
        return "running"
    return f"{event.get('code', '')}: {event.get('reason', '')}"


def row(event: dict) -> tuple[str, ...]:
    when = str(event.get("time", ""))[:19].replace("T", " ")
    kind = str(event.get("event", "")).removeprefix("session.")
    where = event.get("instance") or event.get("target") or ""
    command = " ".join(json.dumps(a) if (not a or " " in a) else a
                       for a in event.get("argv", []))
    return (when, kind, str(event.get("user", "")), str(event.get("namespace", "")), where,
            result_text(event), command)


def render(rows: list[tuple[str, ...]], widths: tuple[int, ...] | None = None) -> list[str]:
    """Aligned lines; the last column is never padded or cut."""
    if widths is None:
        widths = tuple(max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1))
    return ["  ".join([*(v.ljust(w) for v, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
            for r in rows]


def audit_command(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events")]
    = False,
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n")] = None,  # noqa: UP045
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A")] = False,
    user: Annotated[Optional[str], typer.Option(help="only this user's events")] = None,  # noqa: UP045
    since: Annotated[Optional[str], typer.Option(help="e.g. 15m, 1h, 2d")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="one JSON event per line")] = False,
    api_server: Annotated[Optional[str], typer.Option(help="host:port")] = None,  # noqa: UP045
    token_file: Annotated[Optional[str], typer.Option()] = None,  # noqa: UP045
    ca_file: Annotated[Optional[str], typer.Option()] = None,  # noqa: UP045
) -> None:
    """Show audit events (session started, ended, denied, failed); needs the verb `audit`."""
    try:
        since_seconds = parse_since(since) if since else 0.0
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    from rune.cli.main import _client, _run
    from rune.cli.settings import load_user_config

    config = load_user_config()

    async def show() -> int:
        import grpc

        from rune.proto import exec_pb2 as pb

        async with _client(api_server, token_file, ca_file) as client:
            request = pb.AuditRequest(
                namespace=namespace or config.namespace or "default",
                all_namespaces=all_namespaces, user=user or "", since_seconds=since_seconds,
                follow=follow)
            call = client.stub.StreamAudit(request, metadata=client.metadata)
            rows = [COLUMNS]
            if follow and not as_json:
                print(render(rows, FOLLOW_WIDTHS)[0], flush=True)
            try:
                async for item in call:
                    if as_json:
                        sys.stdout.write(item.json + "\n")
                        sys.stdout.flush()
                    elif follow:
                        print(render([row(json.loads(item.json))], FOLLOW_WIDTHS)[0],
                              flush=True)
                    else:
                        rows.append(row(json.loads(item.json)))
            except grpc.aio.AioRpcError as exc:
                raise client.translate(exc) from None
        if not as_json and not follow:
            print("\n".join(render(rows)))
        return 0

    raise typer.Exit(_run(show()))


def register(app: typer.Typer) -> None:
    app.command("audit")(audit_command)
