"""The Docker runner's parts that need no engine: demultiplexing, exit codes, the CI gate."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from rune.agent.runners.docker import derived_instance_id
from rune.agent.runners.docker_exec import HEADER, _demux, _short_reason, start_failure_code


def _frames(*parts: tuple[int, bytes]) -> bytes:
    return b"".join(HEADER.pack(stream, len(data)) + data for stream, data in parts)


def test_demux_keeps_streams_apart_across_any_split():
    """Frames cut at every possible byte boundary still give the exact stdout and stderr."""
    wire = _frames((1, b"hello "), (2, b"oops"), (1, b"world"), (1, b""), (2, b"!" * 70000))
    for cut in range(0, len(wire), 997):
        state: list = [b"", 0, 0]
        got: dict[int, list] = {}
        for piece in (wire[:cut], wire[cut:cut + 5], wire[cut + 5:]):
            _demux(state, piece, got)
        assert b"".join(got[1]) == b"hello world"
        assert b"".join(got[2]) == b"oops" + b"!" * 70000


def test_start_failures_map_to_shell_codes():
    """A missing command is 127; a file without the execute bit or a bad workdir is 126."""
    prefix = "OCI runtime exec failed: exec failed: unable to start container process: "
    missing = prefix + 'exec: "nope": executable file not found in $PATH: unknown'
    assert start_failure_code(_short_reason(missing)) == 127
    assert _short_reason(missing) == 'exec: "nope": executable file not found in $PATH'
    assert start_failure_code(prefix + 'exec: "/no/such": no such file or directory') == 127
    assert start_failure_code(prefix + 'exec: "/etc/passwd": permission denied: unknown') == 126
    assert start_failure_code(prefix + 'chdir to cwd ("/x") set in config.json failed: '
                              "no such file or directory: unknown") == 126


def test_derived_instance_id_is_a_valid_target():
    """A container without rune.instance gets an id with -instance- and no dots."""
    assert derived_instance_id("web", "my.web_1") == "web-instance-my-web_1"


def test_missing_engine_fails_when_required_and_skips_otherwise(tmp_path):
    """Without a reachable engine, Docker tests fail when CI requires them and skip otherwise."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
                     "from conftest import docker_engine  # noqa: F401\n\n"
                     "def test_probe(docker_engine):\n    assert docker_engine\n")
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(probe)]
    skipped = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=120,
                             env={**env, "RUNE_REQUIRE_DOCKER": "0"})
    assert skipped.returncode == 0 and b"no Docker Engine answers" in skipped.stdout
    failed = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=120,
                            env={**env, "RUNE_REQUIRE_DOCKER": "1"})
    assert failed.returncode == 1 and b"RUNE_REQUIRE_DOCKER=1" in failed.stdout


def _compose_command() -> list[str] | None:
    for argv in (["docker", "compose"], ["docker-compose"]):
        try:
            if subprocess.run([*argv, "version"], capture_output=True, timeout=30).returncode == 0:
                return argv
        except OSError:
            continue
    return None


def test_compose_file_is_valid():
    """docker-compose.yml parses, and wires NATS, the apiserver, the agent and a demo service."""
    compose = _compose_command()
    if compose is None:
        reason = "neither `docker compose` nor `docker-compose` is installed"
        if os.environ.get("RUNE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"compose validation is required here: {reason}")
        pytest.skip(reason)
    result = subprocess.run([*compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
                            capture_output=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr.decode()
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) >= {"nats", "apiserver", "agent", "demo"}
    agent_mounts = str(services["agent"]["volumes"])
    assert "/var/run/docker.sock" in agent_mounts
    assert services["agent"]["pid"] == "host"
    assert services["demo"]["labels"] == {"rune.namespace": "default", "rune.service": "demo"}
    assert "ports" not in services["nats"]  # the broker is reachable only inside the stack
