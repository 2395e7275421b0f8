"""Shared fixtures: a real nats-server, rune-apiserver and rune-agent as separate processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from rune.cli import muxwire
from rune.cli.devstack import Stack, free_port, wait_until

# pexpect forks this process (forkpty), which has used gRPC: gRPC's fork handlers would
# rebuild its pollers in the child, whose inherited descriptors pexpect then closes.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

ROOT = Path(__file__).resolve().parent.parent

# RUNE_MUX=on runs every CLI through the multiplexer (scripts/test does it for the CLI-heavy
# files); the default runs each CLI in its own process. Each test gets a multiplexer
# socket directory of its own (short: a Unix socket path has ~100 bytes), so no test shares
# a multiplexer with the user or with another test, and none outlives its test.
MUX_MODE = "on" if os.environ.get("RUNE_MUX", "off").lower() in ("on", "auto", "1") else "off"
_mux = {"dir": tempfile.mkdtemp(prefix="rmux-")}
# Children not started through Rune follow the same mode and never reach the user's.
os.environ["RUNE_MUX"] = MUX_MODE
os.environ["RUNE_MUX_DIR"] = _mux["dir"]


def mux_pid(folder: str) -> int | None:
    try:
        return int(Path(muxwire.pid_path(str(folder))).read_text())
    except (OSError, ValueError):
        return None


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def stop_mux(folder: str) -> None:
    """Stops the multiplexer serving FOLDER, if any, and waits until it is gone."""
    pid = mux_pid(folder)
    if pid is None:
        return
    for signum, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not _gone(pid):
            time.sleep(0.02)
        if _gone(pid):
            return


@pytest.fixture(autouse=True)
def own_mux_dir():
    """A multiplexer socket directory for this test alone; its multiplexer ends with it."""
    folder = tempfile.mkdtemp(prefix="rmux-")
    _mux["dir"] = folder
    yield folder
    stop_mux(folder)
    shutil.rmtree(folder, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    folder = os.environ.get("RUNE_MUX_DIR")
    if folder and Path(folder).name.startswith("rmux-"):
        stop_mux(folder)
        shutil.rmtree(folder, ignore_errors=True)

BASE_SERVICES = [
    {"name": "api", "namespace": "default", "replicas": 2,
     "command": ["sh", "-c", "exec sleep 2147483647"]},
    {"name": "worker", "namespace": "default", "replicas": 1,
     "command": ["sh", "-c", "exec sleep 2147483647"]},
    {"name": "db", "namespace": "prod", "replicas": 1,
     "command": ["sh", "-c", "exec sleep 2147483647"]},
    # A service that never stays up: its instance is never "running".
    {"name": "crashy", "namespace": "default", "replicas": 1,
     "command": ["sh", "-c", "exit 1"]},
]


def start_stack(tmp: Path, agents: dict[str, list[dict]] | None = None,
                api_extra: dict | None = None, agent_extra: dict | None = None) -> Stack:
    stack = Stack(tmp, nats_port=free_port(), api_port=free_port())
    try:
        stack.start_nats()
        stack.start_apiserver(api_extra)
        for agent_id, services in (agents or {"a1": BASE_SERVICES}).items():
            running = sum(s.get("replicas", 1) for s in services if s["name"] != "crashy")
            stack.start_agent(agent_id, services, agent_extra, wait_running=running)
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    stack = start_stack(tmp_path_factory.mktemp("stack"))
    yield stack
    stack.stop()


class Rune:
    """Runs the real `rune` CLI against a stack, as a user would."""

    def __init__(self, stack: Stack, env: dict | None = None, mux: str | None = None) -> None:
        self.stack = stack
        self.mux = mux or MUX_MODE
        self.base_env = {**os.environ, "RUNE_CONFIG": str(stack.state_dir / "no-config.yaml"),
                         **(env or {})}

    @property
    def env(self) -> dict:
        """The CLI's environment, with the running test's multiplexer directory."""
        return {**self.base_env, "RUNE_MUX": self.mux, "RUNE_MUX_DIR": _mux["dir"]}

    def argv(self, *args: str) -> list[str]:
        if args and args[0] in ("exec", "instances"):
            return [sys.executable, "-m", "rune.cli.main", args[0], "--api-server",
                    self.stack.api_address, *args[1:]]
        return [sys.executable, "-m", "rune.cli.main", *args]

    def __call__(self, *args: str, input: bytes | None = None, timeout: float = 60,
                 **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), input=input, capture_output=True,
                              timeout=timeout, env=self.env, cwd=ROOT,
                              stdin=None if input is not None else subprocess.DEVNULL, **kwargs)

    def bare(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """The CLI exactly as given: no --api-server added."""
        return subprocess.run([sys.executable, "-m", "rune.cli.main", *args], capture_output=True,
                              timeout=60, env={**self.env, **(env or {})}, cwd=ROOT,
                              stdin=subprocess.DEVNULL)

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("env", self.env)
        return subprocess.Popen(self.argv(*args), cwd=ROOT, **kwargs)


@pytest.fixture(scope="session")
def rune(stack: Stack) -> Rune:
    return Rune(stack)


# --- Docker: a real engine, containers labelled per run so cleanup is sure ---------------

DOCKER_IMAGE = "rune-test-busybox:latest"
DOCKER_RUN_LABEL = "rune.test"
DOCKER_API_WORKDIR = "/srv/api"
SLEEP_FOREVER = ["sh", "-c", "exec sleep 2147483647"]


def docker_unavailable() -> str | None:
    """Why no Docker test can run here, or None when the engine and the image are there."""
    try:
        import docker
        from docker.errors import DockerException, ImageNotFound
    except ImportError:
        return "the docker Python SDK is not installed"
    try:
        client = docker.APIClient(version="auto", timeout=10, **docker.utils.kwargs_from_env())
        client.ping()
    except (DockerException, OSError) as exc:
        return f"no Docker Engine answers ({exc}); run .ci/docker-up.sh"
    try:
        client.inspect_image(DOCKER_IMAGE)
    except ImageNotFound:
        return f"image {DOCKER_IMAGE} is missing; run tests/images/build-test-image.sh"
    finally:
        client.close()
    return None


class DockerEngine:
    """The test session's handle on the engine: runs labelled containers, removes them all."""

    def __init__(self) -> None:
        import docker

        self.client = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
        self.run_id = f"{os.getpid()}-{time.monotonic_ns()}"
        self.labels = {DOCKER_RUN_LABEL: self.run_id}

    def run(self, labels: dict[str, str], command: list[str] | None = None,
            env: dict[str, str] | None = None, name: str | None = None) -> str:
        """Starts a container of the test image (no network) and returns its id."""
        created = self.client.create_container(
            DOCKER_IMAGE, command or SLEEP_FOREVER, labels={**self.labels, **labels},
            environment=env or {}, name=name,
            host_config=self.client.create_host_config(network_mode="none"))
        self.client.start(created["Id"])
        return created["Id"]

    def cleanup(self) -> None:
        for item in self.client.containers(all=True, filters={
                "label": f"{DOCKER_RUN_LABEL}={self.run_id}"}):
            try:
                self.client.remove_container(item["Id"], force=True)
            except Exception:
                pass
        self.client.close()


@pytest.fixture(scope="session")
def docker_engine():
    """A reachable engine with the test image; skips without one, fails when CI requires it."""
    reason = docker_unavailable()
    if reason:
        if os.environ.get("RUNE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"Docker tests are required here (RUNE_REQUIRE_DOCKER=1): {reason}")
        pytest.skip(reason)
    engine = DockerEngine()
    yield engine
    engine.cleanup()


def docker_agent_extra(engine: DockerEngine, services: list[dict] | None = None) -> dict:
    """Agent config that adopts this run's labelled containers and runs `services`."""
    return {"docker": {"enabled": True, "match_labels": engine.labels,
                       "services": services or []}}


DOCKER_SERVICES = [
    {"name": "api", "namespace": "default", "replicas": 2, "image": DOCKER_IMAGE,
     "command": SLEEP_FOREVER, "network_mode": "none", "workdir": DOCKER_API_WORKDIR},
    {"name": "keeper", "namespace": "default", "replicas": 1, "image": DOCKER_IMAGE,
     "command": SLEEP_FOREVER, "network_mode": "none", "env": {"ROLE": "keeper"}},
]


@pytest.fixture(scope="session")
def docker_stack(tmp_path_factory: pytest.TempPathFactory, docker_engine: DockerEngine):
    """The process stack's instances as containers: api ×2 run by the agent, the rest adopted."""
    engine = docker_engine
    engine.run({"rune.namespace": "default", "rune.service": "worker"})
    engine.run({"rune.namespace": "prod", "rune.service": "db",
                "rune.instance": "db-instance-a1-0"})
    stack = Stack(tmp_path_factory.mktemp("docker-stack"), nats_port=free_port(),
                  api_port=free_port())
    try:
        stack.start_nats()
        stack.start_apiserver()
        stack.start_agent("a1", [], docker_agent_extra(engine, DOCKER_SERVICES), wait_running=5)
        # A container that exits at once: its instance shows "exited", never "running".
        engine.run({"rune.namespace": "default", "rune.service": "crashy"}, ["sh", "-c", "exit 1"])
        wait_until(lambda: any(i.service == "crashy" and i.state == "exited"
                               for i in asyncio.run(stack._list())), "crashy exited")
    except BaseException:
        stack.stop()
        raise
    yield stack
    stack.stop()


def agent_zombies() -> list[int]:
    """Exited children nobody reaped, of any rune agent on this host."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] != b"Z":
                continue
            with open(f"/proc/{int(fields[1])}/cmdline", "rb") as f:
                parent = f.read()
            if b"rune.agent" in parent or b"rune-agent" in parent:
                found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found
