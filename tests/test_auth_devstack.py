"""`rune dev up` with auth on: the README's first commands just work, RBAC is one flag away."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import nats
import pytest
import yaml
from rune.cli.devstack import free_port

ROOT = Path(__file__).resolve().parent.parent


def _rune(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rune.cli.main", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def dev_up(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("devup")
    env = {**os.environ, "RUNE_CONFIG": str(tmp / "config.yaml")}
    env.pop("RUNE_TOKEN_FILE", None)
    nats_port, api_port, dashboard_port = free_port(), free_port(), free_port()
    state = tmp / "state"
    up = _rune(env, "dev", "up", "--detach", "--state-dir", str(state), "--nats-port",
               str(nats_port), "--api-port", str(api_port), "--dashboard-port",
               str(dashboard_port))
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        yield env, up.stdout, state, nats_port
    finally:
        _rune(env, "dev", "down", "--state-dir", str(state))


def test_first_command_just_works(dev_up):
    """After `rune dev up`, `rune exec api ls -la` needs no flag: the config has the token."""
    env, _, _, _ = dev_up
    result = _rune(env, "exec", "api", "ls", "-la")
    assert result.returncode == 0, result.stderr
    assert "README" in result.stdout
    config = yaml.safe_load(Path(env["RUNE_CONFIG"]).read_text())
    token_file = Path(config["token_file"])
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert result.stderr == ""


def test_restricted_user_is_announced_and_restricted(dev_up):
    """The printed `dev` token file works in default and is refused `rm -rf`."""
    env, out, state, _ = dev_up
    dev_token = state / "tokens" / "dev.token"
    assert str(dev_token) in out
    dev_env = {**env, "RUNE_TOKEN_FILE": str(dev_token)}
    assert _rune(dev_env, "exec", "api", "echo", "hi").stdout == "hi\n"
    refused = _rune(dev_env, "exec", "api", "rm", "-rf", "/tmp/nothing-here")
    assert refused.returncode == 255
    assert "permission denied" in refused.stderr
    refused = _rune(dev_env, "exec", "-n", "prod", "api", "ls")
    assert refused.returncode == 255
    assert 'may not exec in namespace "prod"' in refused.stderr


def test_dev_broker_refuses_anonymous_clients(dev_up):
    """The dev stack's nats-server accepts only its nkeys users."""
    _, _, _, nats_port = dev_up

    async def anonymous() -> None:
        await nats.connect(f"nats://127.0.0.1:{nats_port}", allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=2)

    with pytest.raises(Exception, match="(?i)authorization"):
        asyncio.run(anonymous())


def test_dashboard_is_started_and_printed(dev_up):
    """`rune dev up` starts the dashboard and prints its address; unsigned, it shows sign-in."""
    import re
    import urllib.request

    _, out, _, _ = dev_up
    url = re.search(r"dashboard: (http://127\.0\.0\.1:\d+)", out).group(1)
    with urllib.request.urlopen(url + "/") as page:  # redirected to the sign-in page
        assert page.url.endswith("/login") and b'name="token"' in page.read()
