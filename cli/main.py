"""`rune`: run commands inside running service instances, anywhere in the fleet."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Annotated, Optional

import typer
from rune.cli.parsing import mark_command_start, parse_duration, parse_env
from rune.cli.settings import DEFAULT_API_SERVER, UserConfig, load_user_config

from rune.errors import RuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__,
                  rich_markup_mode=None, pretty_exceptions_enable=False)
EXEC_CONTEXT = {"ignore_unknown_options": False, "help_option_names": ["-h", "--help"]}


def fail(message: str, code: int = 255) -> typer.Exit:
    sys.stderr.write(f"Error: {message}\n")
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


def user_config() -> UserConfig:
    try:
        return load_user_config()
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None


def _token(token_file: str | None) -> str | None:
    if not token_file:
        return None
    from rune.cli.tokens import read_token_file

    return read_token_file(token_file)


def _client(api_server: str | None, token_file: str | None, ca_file: str | None):  # noqa: ANN202
    from rune.cli.client import ApiClient

    config = load_user_config()
    return ApiClient(api_server or config.api_server or DEFAULT_API_SERVER,
                     token=_token(token_file or os.environ.get("RUNE_TOKEN_FILE")
                                  or config.token_file),
                     ca_file=ca_file or config.ca_file)


@app.command("exec", context_settings=EXEC_CONTEXT)
def exec_command(
    target: Annotated[str, typer.Argument(help="service name or instance id")],
    command: Annotated[list[str], typer.Argument(help="the command and its arguments")],
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n")] = None,  # noqa: UP045
    workdir: Annotated[str, typer.Option(help="absolute directory to run in")] = "",
    env: Annotated[Optional[list[str]], typer.Option("--env", "-e", help="KEY=VALUE")] = None,  # noqa: UP045
    tty: Annotated[Optional[bool], typer.Option("--tty/--no-tty", "-t",  # noqa: UP045
                                                help="allocate a remote TTY (auto)")] = None,
    timeout: Annotated[str, typer.Option(help="e.g. 30s, 5m, 1h")] = "5m",
    api_server: Annotated[Optional[str], typer.Option(help="host:port")] = None,  # noqa: UP045
    token_file: Annotated[Optional[str], typer.Option()] = None,  # noqa: UP045
    ca_file: Annotated[Optional[str], typer.Option(help="CA bundle for TLS")] = None,  # noqa: UP045
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    all_: Annotated[bool, typer.Option("--all", help="fan out: every running instance of "
                                       "TARGET ('*': of every service)")] = False,
    instances: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--instances", help="fan out to these instance ids (a,b,c)")] = None,
    selector: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--selector", "-l", help="fan out to instances whose labels match k=v[,k=v]")] = None,
    max_parallel: Annotated[int, typer.Option(help="fan-out sessions at once", min=1)] = 64,
    fail_fast: Annotated[bool, typer.Option(help="fan-out: stop the rest at the first "
                                            "failure")] = False,
    no_prefix: Annotated[bool, typer.Option(help="fan-out: no instance prefix")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="fan-out: JSON records, one "
                                              "per line")] = False,
) -> None:
    """Run COMMAND inside an instance of TARGET. Rune's options go before COMMAND."""
    if all_ or instances or selector or json_output or no_prefix or fail_fast:
        from rune.cli.fanout_cmd import fanout_exec

        _exit_now(fanout_exec(
            target, command, namespace=namespace, workdir=workdir, env=env or [], tty=tty,
            timeout=timeout, api_server=api_server, token_file=token_file, ca_file=ca_file,
            all_=all_, instances=instances or [], selector=selector or [],
            max_parallel=max_parallel, fail_fast=fail_fast, prefix=not no_prefix,
            json_output=json_output))
    timeout_seconds, env_map = checked_flags(timeout, env or [], workdir)

    from rune.cli.terminal import decide_tty, window_size

    def say(line: str) -> None:
        if verbose:
            sys.stderr.write(f"rune: {line}\n")

    remote_tty, why = decide_tty(command, tty)
    say(f"tty {'on' if remote_tty else 'off'}: {why}")
    local_tty = remote_tty and sys.stdin.isatty()
    if remote_tty and not sys.stdin.isatty():
        sys.stderr.write("Unable to use a TTY - input is not a terminal or the right kind of "
                         "file; the remote command gets a TTY, the local terminal is left as "
                         "it is\n")
    cols, rows = window_size() if remote_tty else (0, 0)
    config = user_config()
    from rune.cli.client import ExecOptions
    from rune.cli.exec_cmd import ExecCommand

    options = ExecOptions(
        target=target, command=command, namespace=namespace or config.namespace or "default",
        workdir=workdir, env=env_map, tty=remote_tty, width=cols, height=rows,
        timeout=timeout_seconds, term=os.environ.get("TERM") or "xterm-256color")

    async def session() -> int:
        # A gRPC channel belongs to the loop it was made on: make it inside asyncio.run.
        async with _client(api_server, token_file, ca_file) as client:
            say(f"api server {client.address}, namespace {options.namespace}, target {target}")
            return await ExecCommand(client, options, say, local_tty).run()

    _exit_now(_run(session(), "failed to initialize exec session"))


def _exit_now(code: int) -> None:
    """Exits once everything is written, skipping the interpreter's and gRPC's slow
    teardown (output goes out with os.write; flush only what print() buffered)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(coro: object, prefix: str = "") -> int:
    """Runs a client coroutine; a RuneError becomes one `Error: …` line and its exit code."""
    try:
        # Plain asyncio, not uvloop: libuv leaves the shared terminal fds non-blocking,
        # which breaks the user's shell after we exit.
        return asyncio.run(coro)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    except RuneError as exc:
        message = str(exc)
        if prefix and not message.startswith("failed to create API client"):
            from rune.errors import InvalidArgument as Invalid
            from rune.errors import NotFound, NotRunning, PermissionDenied

            if isinstance(exc, (NotFound, NotRunning, PermissionDenied, Invalid)):
                message = f"{prefix}: {message}"
        raise fail(message, exc.exit_code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None


@app.command("instances")
def instances_command(
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n")] = None,  # noqa: UP045
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A")] = False,
    api_server: Annotated[Optional[str], typer.Option(help="host:port")] = None,  # noqa: UP045
    token_file: Annotated[Optional[str], typer.Option()] = None,  # noqa: UP045
    ca_file: Annotated[Optional[str], typer.Option()] = None,  # noqa: UP045
) -> None:
    """List service instances: namespace, service, instance, state, host, runner."""
    config = load_user_config()

    async def listing() -> int:
        async with _client(api_server, token_file, ca_file) as client:
            items = await client.list_instances(namespace or config.namespace or "default",
                                                all_namespaces)
        rows = [("NAMESPACE", "SERVICE", "INSTANCE", "STATE", "HOST", "RUNNER")]
        rows += [(i.namespace, i.service, i.instance_id, i.state, i.host, i.runner)
                 for i in items]
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        for row in rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        return 0

    raise typer.Exit(_run(listing()))


def _register_subapps() -> None:
    from rune.cli.dev import dev_app

    app.add_typer(dev_app, name="dev")
    from rune.cli.audit_cmd import register as register_audit
    from rune.cli.sessions_cmd import sessions_app

    register_audit(app)
    app.add_typer(sessions_app, name="sessions")
    from rune.cli.cp_cmd import register as register_cp

    register_cp(app)


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "exec":
        valued = {"--namespace", "-n", "--workdir", "--env", "-e", "--timeout", "--api-server",
                  "--token-file", "--ca-file", "--instances", "--selector", "-l",
                  "--max-parallel"}
        args = ["exec", *mark_command_start(args[1:], valued)]
    else:
        _register_subapps()
    app(args=args, prog_name="rune")


if __name__ == "__main__":
    main()
