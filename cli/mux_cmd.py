"""`rune mux status|stop|serve`: the per-user multiplexer, seen and steered."""

from __future__ import annotations

import os
import time

import typer
from rune.cli import muxwire
from rune.cli.common import current, fail

mux_app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                      help="The multiplexer that keeps connections to apiservers warm.")


def _folder() -> str:
    try:
        return muxwire.private_dir(muxwire.mux_dir(current().env))
    except OSError as exc:
        raise fail(str(exc)) from None


@mux_app.command("status")
def status() -> None:
    """Say whether a multiplexer runs, since when, and what it holds (exit 1: none)."""
    folder = _folder()
    reply = muxwire.request(folder, {"t": "status"})
    out = current().out
    if reply is None:
        out.write(f"no multiplexer is running (socket {muxwire.socket_path(folder)})\n")
        raise typer.Exit(1)
    up = time.time() - float(reply.get("started", time.time()))
    out.write(f"multiplexer pid {reply.get('pid')}, install {reply.get('version')}, "
              f"up {up:.0f}s, {reply.get('sessions')} session(s), {reply.get('channels')} "
              f"warm channel(s), exits after {reply.get('idle_timeout'):g}s idle\n"
              f"socket {reply.get('socket')}\n")


@mux_app.command("stop")
def stop() -> None:
    """Stop the multiplexer (running sessions end with exit 255)."""
    folder = _folder()
    reply = muxwire.request(folder, {"t": "stop"})
    out = current().out
    if reply is None:
        out.write("no multiplexer is running\n")
        return
    pid = int(reply.get("pid", 0))
    deadline = time.monotonic() + 10
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    out.write(f"multiplexer (pid {pid}) stopped\n")


@mux_app.command("serve")
def serve() -> None:
    """Run the multiplexer in the foreground (it is normally started on first use)."""
    from rune.cli.muxserver import main as serve_main

    serve_main(["--dir", _folder()])
