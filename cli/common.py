"""What every command shares: option declarations, the client they make, how they end.

A command function parses and checks its flags (usage errors exit 2 before any
connection) and returns a Job; `rune.cli.dispatch` runs the Job, in the `rune`
process or in the multiplexer, and turns a RuneError into one `Error: …` line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rune.cli.invocation import Invocation
from rune.cli.parsing import parse_duration, parse_env
from rune.cli.settings import DEFAULT_API_SERVER, Context
from typer.core import TyperCommand

if TYPE_CHECKING:
    from rune.cli.client import ApiClient

# Optional[...] rather than `X | None`: typer reads these annotations at runtime.
NamespaceOption = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--namespace", "-n", metavar="NS",
    help="namespace of the target (default: the context's, else 'default')")]
AllNamespacesOption = Annotated[bool, typer.Option(
    "--all-namespaces", "-A", help="every namespace you may see")]
ApiServerOption = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--api-server", metavar="HOST:PORT",
    help=f"apiserver address; https:// forces TLS (default: the context's, else "
         f"{DEFAULT_API_SERVER})")]
TokenFileOption = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--token-file", metavar="FILE",
    help="bearer token file (default: $RUNE_TOKEN_FILE, else the context's)")]
CaFileOption = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--ca-file", metavar="FILE", help="CA bundle that verifies the apiserver's certificate")]
ContextOption = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--context", metavar="NAME",
    help="a named context of the config (default: $RUNE_CONTEXT, else the current one)")]


class PlainUsage(TyperCommand):
    """Usage lines as users of docker and kubectl read them: `TARGET COMMAND...`."""

    def collect_usage_pieces(self, ctx: object) -> list[str]:
        return [piece.strip("{}") for piece in super().collect_usage_pieces(ctx)]


@dataclass
class Connection:
    """The connection options, as given on the command line (None: not given)."""

    api_server: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    context: str | None = None


@dataclass
class Job:
    """What a command does once its flags are checked; returns the exit status."""

    run: Callable[[Invocation], Awaitable[int]]
    error_prefix: str = ""  # put before refusals (not found, denied) in the error line


def current() -> Invocation:
    """The invocation being parsed (click carries it as the root context's object)."""
    from typer._click.globals import get_current_context

    obj = get_current_context().find_root().obj
    return obj if isinstance(obj, Invocation) else Invocation(argv=[])


def fail(message: str, code: int = 255) -> typer.Exit:
    """Says `Error: MESSAGE` once and gives the exit to raise."""
    err = current().err
    err.write(f"Error: {message}\n")
    err.flush()
    return typer.Exit(code)


def checked_flags(timeout: str, env: list[str], workdir: str) -> tuple[float, dict[str, str]]:
    """--timeout, --env and --workdir, checked alike for one instance or many (exit 2)."""
    try:
        timeout_seconds = parse_duration(timeout)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--timeout") from None
    try:
        env_map = parse_env(env)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--env") from None
    if workdir and not workdir.startswith("/"):
        raise typer.BadParameter("must be an absolute path", param_hint="--workdir")
    return timeout_seconds, env_map


def context_of(inv: Invocation, connection: Connection) -> Context:
    """The chosen context of the user's config (a broken config is a failure, exit 255)."""
    try:
        return inv.config.context(connection.context or inv.env.get("RUNE_CONTEXT"))
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None


def namespace_of(inv: Invocation, given: str | None, connection: Connection) -> str:
    return given or context_of(inv, connection).namespace or "default"


def connect(inv: Invocation, connection: Connection) -> ApiClient:
    """A client for the apiserver the flags, environment and config choose (flags win).

    The token file is read here, for every command, so a rotated or removed token
    counts at once, in the multiplexer too.
    """
    from rune.cli.client import ApiClient
    from rune.cli.tokens import read_token_file

    context = inv.config.context(connection.context or inv.env.get("RUNE_CONTEXT"))
    token_file = connection.token_file or inv.env.get("RUNE_TOKEN_FILE") or context.token_file
    token = read_token_file(inv.path(token_file), inv.err) if token_file else None
    ca_file = connection.ca_file or context.ca_file
    return ApiClient(connection.api_server or context.api_server or DEFAULT_API_SERVER,
                     token=token, ca_file=inv.path(ca_file) if ca_file else None,
                     channels=inv.channels)


def _print_version(value: bool) -> None:
    if value:
        from rune.cli.version import VERSION

        current().out.write(f"rune {VERSION}\n")
        raise typer.Exit(0)


def root_options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="print rune's version and exit")] = False,
    no_mux: Annotated[bool, typer.Option(
        "--no-mux", help="run in this process, not through the multiplexer (also: "
        "RUNE_MUX=off, or `mux: off` in the config)")] = False,
) -> None:
    """Run commands inside running service instances, anywhere in the fleet."""
