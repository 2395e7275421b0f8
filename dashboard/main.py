"""`rune-dashboard`: the operators' web dashboard, served next to a rune apiserver."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import ssl
import sys
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen wants host:port, not {listen!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(listen: str, api_server: str, ca_file: str | None, tls_cert: str | None,
                tls_key: str | None, insecure: bool) -> None:
    from aiohttp import web
    from rune.dashboard.api import Api
    from rune.dashboard.app import build_app

    host, port = split_listen(listen)
    context = None
    if tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls_cert, tls_key)
    elif not is_loopback(host) and not insecure:
        # The same rule as the apiserver's: tokens never cross a network in the clear.
        raise ValueError(f"refusing to serve plaintext HTTP on {listen}, which is not a "
                         "loopback address: give --tls-cert and --tls-key, or --insecure")
    runner = web.AppRunner(build_app(Api(api_server, ca_file), secure=context is not None),
                           access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context, shutdown_timeout=1.0)
    await site.start()
    scheme = "https" if context else "http"
    print(f"rune-dashboard on {scheme}://{listen} (apiserver {api_server})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


@app.command()
def main_command(
    listen: Annotated[str, typer.Option(help="host:port to serve on")] = "127.0.0.1:8480",
    api_server: Annotated[str, typer.Option(help="the apiserver, host:port")] = "localhost:8443",
    ca_file: Annotated[Optional[str], typer.Option(help="CA of the apiserver's TLS")] = None,  # noqa: UP045
    tls_cert: Annotated[Optional[str], typer.Option(help="PEM certificate (chain)")] = None,  # noqa: UP045
    tls_key: Annotated[Optional[str], typer.Option(help="PEM private key")] = None,  # noqa: UP045
    insecure: Annotated[bool, typer.Option(help="allow plaintext off loopback")] = False,
) -> None:
    """Serve the dashboard; sign in there with a rune token."""
    if bool(tls_cert) != bool(tls_key):
        _fail("--tls-cert and --tls-key go together")
    from rune.runtime import run

    try:
        run(serve(listen, api_server, ca_file, tls_cert, tls_key, insecure))
    except (OSError, ValueError, ssl.SSLError) as exc:
        _fail(str(exc))


def _fail(message: str) -> None:
    sys.stderr.write(f"Error: {message}\n")
    raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
