"""`rune-apiserver`: the gRPC front door of Rune Exec."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Annotated, Optional

import grpc
import typer

from apiserver.auth import OpenAccess
from apiserver.config import ApiServerConfig, load
from apiserver.directory import InstanceDirectory
from apiserver.fanout import FanoutService
from apiserver.oversight import start_oversight, stop_oversight
from apiserver.relay import Relay
from apiserver.service import ExecService
from rune.natsconn import connect
from rune.proto import exec_pb2_grpc as pb_grpc
from rune.runtime import configure_logging, run
from rune.subjects import Subjects

log = logging.getLogger(__name__)
app = typer.Typer(add_completion=False, help=__doc__)


async def serve(config: ApiServerConfig) -> None:
    subjects = Subjects(config.prefix)
    nc = await connect(config.nats_url, "rune-apiserver", config.nats_nkey_seed_file)
    directory = InstanceDirectory(nc, subjects, config.lost_after)
    await directory.start()
    access = OpenAccess()
    oversight = await start_oversight(nc, subjects, config)
    service = ExecService(directory, Relay(nc, subjects, config), access, access, oversight)
    options = [
        ("grpc.max_receive_message_length", config.max_message),
        ("grpc.max_send_message_length", config.max_message),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_ExecServiceServicer_to_server(service, server)
    pb_grpc.add_FanoutServiceServicer_to_server(FanoutService(service), server)
    server.add_insecure_port(config.listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"rune-apiserver listening on {config.listen}", flush=True)
    await stop.wait()
    await server.stop(grace=2)
    await directory.stop()
    await stop_oversight(oversight)
    await nc.drain()


@app.callback(invoke_without_command=True)
def main_command(
    ctx: typer.Context,
    config: Annotated[Optional[str], typer.Option(help="YAML config file")] = None,  # noqa: UP045
    listen: Annotated[Optional[str], typer.Option(help="host:port to serve gRPC on")] = None,  # noqa: UP045
    nats_url: Annotated[Optional[str], typer.Option(help="NATS server URL")] = None,  # noqa: UP045
    log_level: str = "INFO",
    log_format: str = "text",
) -> None:
    """Serve the API (the default when no subcommand is given)."""
    if ctx.invoked_subcommand is not None:
        return
    configure_logging(log_level, log_format)
    settings = load(config)
    if listen:
        settings.listen = listen
    if nats_url:
        settings.nats_url = nats_url
    run(serve(settings))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
