"""`rune audit`: who ran what, where, when and with what result, from the audit stream."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
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

from rune.display import printable

COLUMNS = ("TIME", "EVENT", "USER", "NAMESPACE", "INSTANCE", "RESULT", "COMMAND")
FOLLOW_WIDTHS = (19, 7, 12, 10, 24, 24)


def parse_since(text: str) -> float:
    """'90s', '15m', '1h', '2d' → seconds (days added to the exec duration syntax)."""
    from rune.cli.parsing import parse_duration

    if text.strip().endswith("d") and text.strip()[:-1].replace(".", "", 1).isdigit():
        return float(text.strip()[:-1]) * 86400
    return parse_duration(text)


def copy_direction(event: dict) -> str:
    """'upload' or 'download' for a copy's event (a refused one names it in argv), else ''."""
    if event.get("direction") in ("upload", "download"):
        return event["direction"]
    argv = event.get("argv") or []
    if len(argv) >= 2 and argv[0] == "rune-cp":
        return {"cp-write": "upload", "cp-read": "download"}.get(argv[1], "")
    return ""


def size_text(n: object) -> str:
    n = n if isinstance(n, int) and n >= 0 else 0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def copy_result(event: dict, direction: str) -> str:
    """A copy's summary on one line: direction, outcome, files, bytes, manifest digest."""
    name = event.get("event")
    if name == "session.started":
        return f"{direction} running"
    if name == "session.ended":
        failed = event.get("failed_files") or 0
        files = f"{event.get('files', 0)} files" + (f" ({failed} failed)" if failed else "")
        digest = str(event.get("manifest_sha256", ""))[:16]
        return (f"{direction} {'ok' if not failed else 'partial'}: {files}, "
                f"{size_text(event.get('bytes'))}" + (f", manifest {digest}" if digest else ""))
    passed = ""
    if name == "session.failed" and event.get("files"):
        passed = f" after {event['files']} files, {size_text(event.get('bytes'))}"
    return f"{direction} {name.removeprefix('session.')}{passed}: " \
        f"{event.get('code', '')}: {event.get('reason', '')}"


def result_text(event: dict) -> str:
    direction = copy_direction(event)
    if direction and event.get("event") in ("session.started", "session.ended",
                                            "session.failed", "session.denied"):
        return copy_result(event, direction)
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
    command = " ".join(f'"{a}"' if (not a or " " in a) else a
                       for a in event.get("argv", []))
    return (when, kind, str(event.get("user", "")), str(event.get("namespace", "")), where,
            result_text(event), command)


def render(rows: list[tuple[str, ...]], widths: tuple[int, ...] | None = None) -> list[str]:
    """Aligned lines; the last column is never padded or cut. Every cell is shown with its
    control characters escaped: an argv can neither move the cursor nor forge a row."""
    rows = [tuple(printable(str(v)) for v in r) for r in rows]
    if widths is None:
        widths = tuple(max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1))
    return ["  ".join([*(v.ljust(w) for v, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
            for r in rows]


def audit_command(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events")]
    = False,
    namespace: NamespaceOption = None,
    all_namespaces: AllNamespacesOption = False,
    user: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--user", metavar="NAME", help="only this user's events")] = None,
    since: Annotated[Optional[str], typer.Option(  # noqa: UP045
        metavar="DURATION", help="only events this recent: 15m, 1h, 2d")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON event per line")] = False,
    api_server: ApiServerOption = None,
    token_file: TokenFileOption = None,
    ca_file: CaFileOption = None,
    context: ContextOption = None,
) -> Job:
    """Show audit events (session started, ended, denied, failed); needs the verb `audit`."""
    try:
        since_seconds = parse_since(since) if since else 0.0
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    connection = Connection(api_server, token_file, ca_file, context)
    chosen = namespace_of(current(), namespace, connection)

    async def show(inv: Invocation) -> int:
        from rune.proto import exec_pb2 as pb

        out = inv.out
        request = pb.AuditRequest(namespace=chosen, all_namespaces=all_namespaces,
                                  user=user or "", since_seconds=since_seconds, follow=follow)
        rows = [COLUMNS]
        async with connect(inv, connection) as client:
            if follow and not as_json:
                out.write(render(rows, FOLLOW_WIDTHS)[0] + "\n")
            async for item in client.stream_audit(request):
                if as_json:
                    out.write(item.json + "\n")
                elif follow:
                    out.write(render([row(json.loads(item.json))], FOLLOW_WIDTHS)[0] + "\n")
                else:
                    rows.append(row(json.loads(item.json)))
        if not as_json and not follow:
            out.write("\n".join(render(rows)) + "\n")
        return 0

    return Job(show)
