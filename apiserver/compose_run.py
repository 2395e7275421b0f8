"""Starting the compose stack's apiserver, agent and dashboard, and the stack's healthchecks.

`run apiserver|agent|dashboard` waits for what the service needs (the init service's files, then
NATS answering) instead of crash-looping while they are missing, says so in one line,
then replaces itself with the real program. `health nats|apiserver|agent|dashboard` is each
service's healthcheck: exit 0 when healthy.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import yaml

ETC = Path(os.environ.get("RUNE_COMPOSE_ROOT", "/etc/rune"))
NATS_HOST, NATS_PORT = "nats", 4222
AGENT_METRICS = "127.0.0.1:9464"
API_SERVER = "apiserver:8443"
DASHBOARD_LISTEN = "0.0.0.0:8480"
# How long to wait for the init service's files before saying what is wrong and exiting.
FILES_TIMEOUT = float(os.environ.get("RUNE_COMPOSE_WAIT", "120"))
# While waiting for NATS, a line this often: the count of seconds shows it is one wait.
REMIND_EVERY = 10.0


def say(message: str) -> None:
    print(f"rune compose: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> None:
    """One clear line in `docker compose logs`, then exit (the restart policy retries)."""
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()
    sys.exit(1)


def wait_for_files(paths: list[Path], timeout: float | None = None) -> None:
    timeout = FILES_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            return
        if time.monotonic() > deadline:
            fail(f"{missing[0]} is missing: the init service has not written the stack's "
                 "credentials (see `docker compose logs init`)")
        if not announced:
            say(f"waiting for {missing[0]} (written by the init service)")
            announced = True
        time.sleep(0.5)


def nats_answers(host: str, port: int) -> bool:
    """A NATS server greets every client with INFO before anything else."""
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.settimeout(2)
            return conn.recv(5) == b"INFO "
    except OSError:
        return False


def nats_refusal(url: str, seed: Path) -> str | None:
    """Why NATS refuses this service's nkey, or None when it lets it in."""
    import asyncio

    import nats

    async def quiet(exc: Exception) -> None:
        pass

    async def probe() -> None:
        nc = await nats.connect(url, nkeys_seed=str(seed), allow_reconnect=False,
                                max_reconnect_attempts=0, connect_timeout=5, error_cb=quiet)
        await nc.close()

    try:
        asyncio.run(probe())
    except Exception as exc:  # nats-py raises its own errors, OSError, and timeouts
        return str(exc) or type(exc).__name__
    return None


def wait_for_nats(seed: Path, host: str = NATS_HOST, port: int = NATS_PORT) -> None:
    """Until NATS answers; then a refused nkey is a misconfiguration, said in one line."""
    started = time.monotonic()
    reminded = 0.0
    while not nats_answers(host, port):
        waited = time.monotonic() - started
        if reminded == 0.0 or waited - reminded >= REMIND_EVERY:
            say(f"waiting for NATS at {host}:{port} ({waited:.0f}s so far)")
            reminded = max(waited, 0.001)
        time.sleep(0.5)
    refusal = nats_refusal(f"nats://{host}:{port}", seed)
    if refusal:
        fail(f"NATS at {host}:{port} refuses this service's nkey {seed} ({refusal}): the "
             "stack's volumes are out of step; `docker compose down -v`, then up again")


def own_compose_project() -> str | None:
    """The compose project of this container, read from the engine (the agent has its socket)."""
    import docker
    from docker.errors import DockerException, NotFound

    try:
        client = docker.from_env(timeout=10)
    except DockerException as exc:
        fail(f"the agent cannot reach the Docker Engine ({exc}): mount its socket, "
             "/var/run/docker.sock, into the agent's container")
    try:
        labels = client.containers.get(socket.gethostname()).labels
    except NotFound:
        say("this container is not named by its hostname; adopting every labelled "
            "container on the engine")
        return None
    except DockerException as exc:
        fail(f"the agent cannot reach the Docker Engine ({exc})")
    finally:
        client.close()
    return labels.get("com.docker.compose.project")


def agent_config(seed: Path, project: str | None) -> dict:
    # Only this project's containers: another stack on the same engine keeps its own.
    match = {"com.docker.compose.project": project} if project else {}
    return {
        "agent_id": "compose",
        "host": os.environ.get("RUNE_AGENT_HOST", "compose"),
        "nats": {"url": f"nats://{NATS_HOST}:{NATS_PORT}", "nkey_seed_file": str(seed)},
        "state_dir": "/tmp/rune-agent",
        "metrics_listen": AGENT_METRICS,
        "docker": {"enabled": True, "match_labels": match},
    }


def run_apiserver() -> None:
    config = ETC / "apiserver" / "apiserver.yaml"
    seed = ETC / "apiserver" / "apiserver.nk"
    wait_for_files([config, seed])
    wait_for_nats(seed)
    os.execvp("rune-apiserver", ["rune-apiserver", "--config", str(config)])


def run_agent() -> None:
    seed = ETC / "agent" / "agent.nk"
    wait_for_files([seed])
    project = own_compose_project()
    wait_for_nats(seed)
    path = Path("/tmp/rune-agent.yaml")
    path.write_text(yaml.safe_dump(agent_config(seed, project), sort_keys=False))
    os.execvp("rune-agent", ["rune-agent", "--config", str(path)])


def run_dashboard() -> None:
    """TLS even inside the compose network: the browser's sign-in carries a rune token."""
    own = ETC / "dashboard"
    cert, key, ca = own / "tls.crt", own / "tls.key", own / "ca.crt"
    wait_for_files([cert, key, ca])
    os.execvp("rune-dashboard", ["rune-dashboard", "--listen", DASHBOARD_LISTEN,
                                 "--api-server", API_SERVER, "--ca-file", str(ca),
                                 "--tls-cert", str(cert), "--tls-key", str(key)])


def http_ok(url: str, ca_file: Path | None = None) -> bool:
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as reply:
            return reply.status == 200
    except OSError:
        return False


def apiserver_healthy() -> bool:
    """TLS with the stack's CA, then an unauthenticated call that must be refused as such."""
    import grpc

    from rune.proto import exec_pb2 as pb
    from rune.proto import exec_pb2_grpc as pb_grpc

    ca = (ETC / "apiserver" / "ca.crt").read_bytes()
    channel = grpc.secure_channel("localhost:8443", grpc.ssl_channel_credentials(ca))
    try:
        pb_grpc.ExecServiceStub(channel).ListInstances(pb.ListInstancesRequest(), timeout=3)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()
    return False  # answered without a token: auth is off, which this stack never is


def healthy(service: str) -> bool:
    if service == "nats":
        return http_ok("http://127.0.0.1:8222/healthz")
    if service == "agent":
        return http_ok(f"http://{AGENT_METRICS}/metrics")
    if service == "apiserver":
        return apiserver_healthy()
    if service == "dashboard":
        port = DASHBOARD_LISTEN.rpartition(":")[2]
        return http_ok(f"https://localhost:{port}/healthz", ETC / "dashboard" / "ca.crt")
    raise ValueError(f"no healthcheck for {service!r}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # As PID 1 of its container this process ignores SIGTERM unless it says otherwise, and
    # `docker compose stop` would wait out its grace period while it waits for NATS.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    launchers = {"apiserver": run_apiserver, "agent": run_agent, "dashboard": run_dashboard}
    if len(args) == 2 and args[0] == "run" and args[1] in launchers:
        launchers[args[1]]()
        return 0  # not reached: exec replaced this process
    if len(args) == 2 and args[0] == "health":
        return 0 if healthy(args[1]) else 1
    sys.stderr.write("usage: python -m rune.apiserver.compose_run "
                     "run apiserver|agent|dashboard | health nats|apiserver|agent|dashboard\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
