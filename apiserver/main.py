"""`rune-apiserver`: the gRPC front door of Rune Exec."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import uuid
from typing import Annotated, Optional

import grpc
import typer
from rune.apiserver.config import ApiServerConfig, load
from rune.apiserver.wire import COPY_PARSERS, register

from rune.runtime import configure_logging, run, settle_heap

log = logging.getLogger(__name__)
app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)
token_app = typer.Typer(add_completion=False, help="Manage bearer tokens.")
app.add_typer(token_app, name="token")


def build_access(config: ApiServerConfig) -> tuple[object, object]:
    """The authenticator and authorizer the config asks for."""
    from rune.apiserver.auth import OpenAccess

    if not config.auth.enabled:
        return OpenAccess(), OpenAccess()
    from rune.apiserver.rbac import RoleAuthorizer
    from rune.apiserver.tokens import TokenAuthenticator

    return TokenAuthenticator(config.auth.tokens), RoleAuthorizer(config.auth, config.exec)


async def serve(config: ApiServerConfig) -> None:
    from rune.apiserver.admission import Admission
    from rune.apiserver.directory import InstanceDirectory
    from rune.apiserver.fanout import FanoutService
    from rune.apiserver.limits import SessionLimits
    from rune.apiserver.oversight import start_oversight, stop_oversight
    from rune.apiserver.service import ExecService
    from rune.apiserver.session import SessionCore
    from rune.apiserver.tls import check_plaintext_allowed, is_loopback, server_credentials

    from rune.natsconn import connect
    from rune.proto import exec_pb2_grpc as pb_grpc
    from rune.subjects import Subjects

    tls = bool(config.tls_cert and config.tls_key)
    if not tls:
        check_plaintext_allowed(config.listen, config.insecure)
    if not config.auth.enabled and not is_loopback(config.listen) and not config.insecure:
        raise ValueError("refusing to serve without authentication on a non-loopback "
                         "address: enable auth, or give --insecure")
    authn, authz = build_access(config)
    subjects = Subjects(config.prefix)
    nc = await connect(config.nats_url, "rune-apiserver", config.nats_nkey_seed_file,
                       inbox_prefix=subjects.inbox("apiserver"))
    directory = InstanceDirectory(nc, subjects, config.lost_after,
                                  {a: b.namespaces for a, b in config.agents.items()})
    await directory.start()
    limits = config.limits
    if not config.auth.enabled:  # everyone is "anonymous": a per-user cap would be global
        limits = limits.model_copy(update={"max_sessions_per_user": 0})
    oversight = await start_oversight(nc, subjects, config)
    core = SessionCore(nc, subjects, config, directory, SessionLimits(limits), oversight)
    board = None
    if config.share_sessions:
        from rune.apiserver.peers import SessionBoard

        board = SessionBoard(nc, subjects, config.apiserver_id or uuid.uuid4().hex[:12],
                             core.kill)
        await board.start()
        core.board = board
        core.limits.elsewhere = board.counts
    admission = Admission(authn, authz, directory, limits, config.max_timeout, oversight)
    service = ExecService(core, admission)
    # gRPC's own cap sits above ours, so an oversized message reaches our check and is
    # refused as INVALID_ARGUMENT with a clear message instead of a transport error.
    options = [
        ("grpc.max_receive_message_length", config.max_message * 2 + 65536),
        ("grpc.max_send_message_length", config.max_message),
    ]
    server = grpc.aio.server(options=options)
    from rune.apiserver.copy_service import CopyService

    # Data responses may be written pre-encoded (apiserver/wire.py).
    register(pb_grpc.add_ExecServiceServicer_to_server, service, server)
    register(pb_grpc.add_FanoutServiceServicer_to_server, FanoutService(service), server)
    register(pb_grpc.add_CopyServiceServicer_to_server, CopyService(service, config), server,
             COPY_PARSERS)
    if tls:
        server.add_secure_port(config.listen, server_credentials(config.tls_cert,
                                                                 config.tls_key))
    else:
        server.add_insecure_port(config.listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    settle_heap()
    print(f"rune-apiserver listening on {config.listen} ({'TLS' if tls else 'plaintext'}, "
          f"auth {'on' if config.auth.enabled else 'OFF'})", flush=True)
    await stop.wait()
    await server.stop(grace=2)
    await directory.stop()
    if board is not None:
        await board.stop()
    await stop_oversight(oversight)
    await nc.drain()


@app.callback(invoke_without_command=True)
def main_command(
    ctx: typer.Context,
    config: Annotated[Optional[str], typer.Option(help="YAML config file")] = None,  # noqa: UP045
    listen: Annotated[Optional[str], typer.Option(help="host:port to serve gRPC on")] = None,  # noqa: UP045
    nats_url: Annotated[Optional[str], typer.Option(help="NATS server URL")] = None,  # noqa: UP045
    tls_cert: Annotated[Optional[str], typer.Option(help="PEM certificate (chain)")] = None,  # noqa: UP045
    tls_key: Annotated[Optional[str], typer.Option(help="PEM private key")] = None,  # noqa: UP045
    insecure: Annotated[bool, typer.Option(
        help="allow plaintext or no auth on a non-loopback address")] = False,
    log_level: str = "INFO",
    log_format: str = "text",
) -> None:
    """Serve the API (the default when no subcommand is given)."""
    if ctx.invoked_subcommand is not None:
        return
    configure_logging(log_level, log_format)
    try:
        settings = load(config)
    except (OSError, ValueError) as exc:
        _fail(f"bad config {config}: {exc}")
    for name, value in (("listen", listen), ("nats_url", nats_url), ("tls_cert", tls_cert),
                        ("tls_key", tls_key)):
        if value:
            setattr(settings, name, value)
    settings.insecure = settings.insecure or insecure
    if bool(settings.tls_cert) != bool(settings.tls_key):
        _fail("--tls-cert and --tls-key go together")
    from rune.errors import RuneError
    from rune.heap import keep_freed_buffers

    keep_freed_buffers()  # process-wide: relayed chunks reuse warm pages (rune/heap.py)
    try:
        run(serve(settings))
    except (OSError, ValueError, RuneError) as exc:
        _fail(str(exc))


def _fail(message: str) -> None:
    sys.stderr.write(f"Error: {message}\n")
    raise typer.Exit(1)


@token_app.command("create")
def token_create(
    user: Annotated[str, typer.Option(help="the user the token authenticates")],
    config: Annotated[str, typer.Option(help="the apiserver's YAML config to add it to")],
    group: Annotated[Optional[list[str]], typer.Option(help="a group, repeatable")] = None,  # noqa: UP045
) -> None:
    """Make a new token: printed once, only its hash is written to the config."""
    from rune.apiserver.tokens import create_token

    print(create_token(config, user, group or []))
    sys.stderr.write(f"token for user {user} added to {config} (as a hash); restart the "
                     "apiserver to use it. Store the token in a file readable only by you.\n")


@app.command("broker-config")
def broker_config(
    agents: Annotated[str, typer.Option(help="comma-separated agent ids")],
    out: Annotated[str, typer.Option(help="directory to write into")] = "broker_config/out",
    prefix: str = "rune",
    cluster: Annotated[int, typer.Option(help="also write an N-node cluster (N >= 3)")] = 0,
    host: Annotated[str, typer.Option(help="address the cluster nodes listen on")] = "127.0.0.1",
    client_port: Annotated[int, typer.Option(help="first node's client port")] = 4222,
    cluster_port: Annotated[int, typer.Option(help="first node's route port")] = 6222,
) -> None:
    """Write nats-server auth config and nkeys seeds for the apiserver, agents, audit."""
    from rune.broker_config.generate import generate

    ids = [a.strip() for a in agents.split(",") if a.strip()]
    try:
        written = generate(out, ids, prefix, cluster, host, client_port, cluster_port)
    except ValueError as exc:
        _fail(str(exc))
    for path in written:
        print(path)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
