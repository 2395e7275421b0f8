"""Containers as instances on a real Docker Engine: registry following, TTY, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from conftest import ROOT, Rune
from rune.cli.devstack import wait_until

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def rune(docker_stack) -> Rune:
    return Rune(docker_stack)


def _states(stack, service: str) -> dict[str, str]:
    return {i.instance_id: i.state for i in asyncio.run(stack._list()) if i.service == service}


def _seconds_until(check, limit: float = 15.0) -> float:
    """How long until check() holds (bounded by limit): registry changes follow events."""
    start = time.monotonic()
    wait_until(check, "registry change", timeout=limit)
    return time.monotonic() - start


def test_labelled_container_comes_and_goes(rune, docker_stack, docker_engine):
    """A labelled container shows up running, then exited when stopped, then is gone."""
    cid = docker_engine.run({"rune.namespace": "default", "rune.service": "web"},
                            name=f"web-{docker_engine.run_id}")
    instance = f"web-instance-web-{docker_engine.run_id}"
    appeared = _seconds_until(lambda: _states(docker_stack, "web").get(instance) == "running")
    listing = rune("instances").stdout.decode()
    assert instance in listing and "docker" in listing
    assert rune("exec", instance, "echo", "in web").stdout == b"in web\n"
    docker_engine.client.stop(cid, timeout=0)
    exited = _seconds_until(lambda: _states(docker_stack, "web").get(instance) == "exited")
    result = rune("exec", instance, "true")
    assert result.returncode == 255 and "not running" in result.stderr.decode()
    docker_engine.client.remove_container(cid)
    gone = _seconds_until(lambda: instance not in _states(docker_stack, "web"))
    print(f"registry latency: appeared {appeared:.3f}s, exited {exited:.3f}s, gone {gone:.3f}s")


def test_instance_label_names_the_instance(rune, docker_stack, docker_engine):
    """rune.instance, when given, is the instance id exec targets."""
    instance = f"svc-instance-{docker_engine.run_id}"
    docker_engine.run({"rune.namespace": "default", "rune.service": "svc",
                       "rune.instance": instance}, env={"WHO": "labelled"})
    wait_until(lambda: _states(docker_stack, "svc").get(instance) == "running", "adopted")
    assert rune("exec", instance, "sh", "-c", "echo $WHO").stdout == b"labelled\n"
    assert rune("exec", "svc", "sh", "-c", "echo $WHO").stdout == b"labelled\n"


def test_unlabelled_and_foreign_containers_are_ignored(docker_stack, docker_engine):
    """Containers without the labels, outside the selection or another agent's are skipped."""
    docker_engine.run({"rune.service": "halfway"})  # no namespace label
    docker_engine.run({"rune.namespace": "default", "rune.service": "elsewhere",
                       "rune.agent": "another-agent"})
    marker = {"rune.namespace": "default", "rune.service": "foreign"}
    created = docker_engine.client.create_container(
        "rune-test-busybox:latest", ["sleep", "600"], labels={**marker, "rune.test": "other"},
        host_config=docker_engine.client.create_host_config(network_mode="none"))
    try:
        docker_engine.client.start(created["Id"])
        # A labelled container of this run, started after both, proves the events were seen.
        docker_engine.run({"rune.namespace": "default", "rune.service": "witness"})
        wait_until(lambda: _states(docker_stack, "witness"), "witness adopted")
        services = {i.service for i in asyncio.run(docker_stack._list())}
        assert not services & {"halfway", "foreign", "elsewhere"}
    finally:
        docker_engine.client.remove_container(created["Id"], force=True)


def test_signal_is_delivered_to_the_container_command(rune):
    """SIGTERM to `rune exec` reaches the command inside the container (its trap runs)."""
    script = 'trap "echo got TERM; exit 3" TERM; echo ready; while :; do sleep 0.1; done'
    proc = rune.popen("exec", "api", "sh", "-c", script, stdout=subprocess.PIPE,
                      stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.read() == b"got TERM\n"
        assert proc.wait(timeout=30) == 3
    finally:
        proc.kill()
        proc.wait()


def test_tty_shell_is_interactive_and_resizes(docker_stack):
    """`rune exec -t api sh` is a live shell under a TTY; a local resize reaches it."""
    env = {**os.environ, "RUNE_CONFIG": str(Path(docker_stack.state_dir) / "none.yaml")}
    child = pexpect.spawn(sys.executable, ["-m", "rune.cli.main", "exec", "--api-server",
                                           docker_stack.api_address, "-t", "api", "sh"],
                          cwd=str(ROOT), env=env, dimensions=(30, 100), timeout=30)
    try:
        child.sendline("stty size; tty")
        child.expect(r"30 100\r\n/dev/pts/\d+")
        child.setwinsize(50, 132)  # SIGWINCH to the CLI, which forwards the new size
        child.sendline("stty size")
        child.expect(r"50 132")
        child.sendline("exit 5")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 5


def test_tty_separate_output_is_one_stream(rune):
    """With -t the command's stderr arrives on the terminal stream, like docker exec -t."""
    result = rune("exec", "-t", "api", "sh", "-c", "echo out; echo err >&2")
    assert result.stdout.replace(b"\r\n", b"\n") == b"out\nerr\n"


def test_tty_command_not_found_is_127(rune):
    """Under a TTY too, a command missing from the image exits 127 with a message."""
    result = rune("exec", "-t", "api", "no-such-command-xyz")
    assert result.returncode == 127
    assert b"no-such-command-xyz" in result.stdout + result.stderr


def test_missing_workdir_is_126(rune):
    """A --workdir that does not exist in the container exits 126, saying why."""
    result = rune("exec", "--workdir", "/no/such/dir", "api", "pwd")
    assert result.returncode == 126
    assert b"/no/such/dir" in result.stderr


def test_service_run_by_the_agent_is_restarted(rune, docker_stack, docker_engine):
    """A configured service's container that dies is started again, and exec works on it."""
    name = "rune-a1-keeper-0"
    before = docker_engine.client.inspect_container(name)["State"]
    os.kill(before["Pid"], signal.SIGKILL)  # its main process dies, not a user's stop
    wait_until(lambda: (docker_engine.client.inspect_container(name)["State"]["Pid"]
                        not in (0, before["Pid"])), "keeper restarted", timeout=30)
    wait_until(lambda: _states(docker_stack, "keeper").get("keeper-instance-a1-0") == "running",
               "keeper running again")
    result = rune("exec", "keeper-instance-a1-0", "sh", "-c", "echo $ROLE $RUNE_SERVICE")
    assert result.stdout == b"keeper keeper\n"
