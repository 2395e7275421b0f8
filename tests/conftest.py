"""Shared fixtures: a real nats-server, rune-apiserver and rune-agent as separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.devstack import Stack, free_port

# pexpect forks this process (forkpty), which has used gRPC: gRPC's fork handlers would
# rebuild its pollers in the child, whose inherited descriptors pexpect then closes.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

ROOT = Path(__file__).resolve().parent.parent

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

    def __init__(self, stack: Stack, env: dict | None = None) -> None:
        self.stack = stack
        self.env = {**os.environ, "RUNE_CONFIG": str(stack.state_dir / "no-config.yaml"),
                    **(env or {})}

    def argv(self, *args: str) -> list[str]:
        if args and args[0] in ("exec", "instances"):
            return [sys.executable, "-m", "cli.main", args[0], "--api-server",
                    self.stack.api_address, *args[1:]]
        return [sys.executable, "-m", "cli.main", *args]

    def __call__(self, *args: str, input: bytes | None = None, timeout: float = 60,
                 **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), input=input, capture_output=True,
                              timeout=timeout, env=self.env, cwd=ROOT,
                              stdin=None if input is not None else subprocess.DEVNULL, **kwargs)

    def bare(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """The CLI exactly as given: no --api-server added."""
        return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                              timeout=60, env={**self.env, **(env or {})}, cwd=ROOT,
                              stdin=subprocess.DEVNULL)

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("env", self.env)
        return subprocess.Popen(self.argv(*args), cwd=ROOT, **kwargs)


@pytest.fixture(scope="session")
def rune(stack: Stack) -> Rune:
    return Rune(stack)
