"""A stack with authentication on (admin `ops`, restricted `dev`) and the dashboard in front."""

from __future__ import annotations

import pytest
from rune.cli.devstack import Stack, free_port

SERVICES = [
    {"name": "api", "namespace": "default", "replicas": 2,
     "command": ["sh", "-c", "exec sleep 2147483647"]},
    {"name": "db", "namespace": "prod", "replicas": 1,
     "command": ["sh", "-c", "exec sleep 2147483647"]},
]


def start_signed_in_stack(tmp) -> tuple[Stack, str]:
    stack = Stack(tmp, nats_port=free_port(), api_port=free_port())
    stack.secure(["a1"], admin="ops")
    try:
        stack.start_nats()
        stack.start_apiserver()
        stack.start_agent("a1", SERVICES)
        port = free_port()
        stack.start_dashboard(port)
    except BaseException:
        stack.stop()
        raise
    return stack, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def signed_in_stack(tmp_path_factory):
    stack, base = start_signed_in_stack(tmp_path_factory.mktemp("dashboard-stack"))
    yield stack, base
    stack.stop()
