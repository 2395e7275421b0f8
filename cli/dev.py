"""`rune dev up|down`: the whole stack on this machine, for trying Rune in a minute."""

from __future__ import annotations

import getpass
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rune.cli.devstack import (
    DEV_USER,
    Stack,
    StackError,
    demo_account,
    demo_isolation,
    demo_services,
    stop_pid,
)

dev_app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="Run the local development stack.")
DEFAULT_STATE = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / \
    "rune" / "dev"


@dev_app.command("up")
def up(
    detach: Annotated[bool, typer.Option("--detach", "-d", help="return once ready")] = False,
    state_dir: Annotated[Path, typer.Option(help="where state and logs go")] = DEFAULT_STATE,
    nats_port: Annotated[int, typer.Option(help="nats-server client port")] = 4222,
    api_port: Annotated[int, typer.Option(help="rune-apiserver gRPC port")] = 8443,
    dashboard_port: Annotated[int, typer.Option(help="rune-dashboard web port")] = 8480,
) -> None:
    """Start nats-server, rune-apiserver and one agent with demo services."""
    pids = state_dir / "pids.json"
    if pids.exists() and _alive(json.loads(pids.read_text())):
        sys.stderr.write(f"Error: a dev stack is already running (see {pids}); "
                         "run `rune dev down` first\n")
        raise typer.Exit(255)
    stack = Stack(state_dir, nats_port=nats_port, api_port=api_port)
    stack.secure(["local"], admin=getpass.getuser())
    try:
        account = demo_account()
        isolation = demo_isolation(stack.state_dir) if account is None else None
        print(f"starting nats-server on {stack.nats_url} ...", flush=True)
        stack.start_nats()
        print(f"starting rune-apiserver on {stack.api_address} ...", flush=True)
        stack.start_apiserver()
        runs_as = f"as user {account}" if account else \
            "as you, with the stack's state, your CLI config and your home hidden"
        print(f"starting rune-agent local with services api (2) and worker (1) {runs_as} ...",
              flush=True)
        stack.start_agent("local", demo_services(account, isolation))
        print(f"starting rune-dashboard on http://127.0.0.1:{dashboard_port} ...", flush=True)
        stack.start_dashboard(dashboard_port)
    except (StackError, OSError) as exc:
        stack.stop()
        sys.stderr.write(f"Error: {exc}\n")
        raise typer.Exit(255) from None
    stack.save_pids()
    api_flag = "" if api_port == 8443 else f" --api-server {stack.api_address}"
    config_file = _point_cli_at(stack, api_port)
    dev_token = stack.token_files[DEV_USER]
    print(f"\nready. logs in {stack.logs}\n"
          f"your admin token: {stack.token_files[stack.admin]} (set in {config_file})\n"
          f"restricted user {DEV_USER!r} (exec and list in namespace default only, "
          f"rm -rf and friends blocked): {dev_token}\n"
          f"dashboard: http://127.0.0.1:{dashboard_port} (sign in with your admin token)\n"
          f"\ntry:\n  rune instances{api_flag}\n"
          f"  rune exec{api_flag} api ls -la\n  rune exec{api_flag} api sh\n"
          f"  rune exec{api_flag} --token-file {dev_token} -n prod api ls   # denied\n")
    if detach:
        print("stop it with: rune dev down")
        return
    print("press Ctrl+C to stop", flush=True)
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        signal.sigwait(stop_signals)
    finally:
        print("stopping ...", flush=True)
        stack.stop()
        pids.unlink(missing_ok=True)


@dev_app.command("down")
def down(
    state_dir: Annotated[Path, typer.Option(help="where `up` keeps its state")] = DEFAULT_STATE,
) -> None:
    """Stop exactly the processes `rune dev up --detach` started."""
    pids = state_dir / "pids.json"
    if not pids.exists():
        print("no dev stack is running")
        return
    recorded = json.loads(pids.read_text())
    for name in sorted(recorded, key=lambda n: (not n.startswith("agent"), n == "nats")):
        print(f"stopping {name} (pid {recorded[name]})")
        stop_pid(recorded[name])
    pids.unlink()


def _point_cli_at(stack: Stack, api_port: int) -> Path:
    """Makes the user's CLI config use the dev stack's admin token (other keys are kept)."""
    from rune.cli.settings import load_user_config, save_user_config

    config = load_user_config()
    config.token_file = str(stack.token_files[stack.admin])
    if api_port != 8443 or config.api_server:
        config.api_server = stack.api_address
    return save_user_config(config)


def _alive(recorded: dict[str, int]) -> bool:
    for pid in recorded.values():
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            continue
    return False
