"""Containers as instances on a real Docker Engine: registry following, TTY, signals."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from conftest import ROOT, Rune, agent_zombies
from rune.agent.runners.parked import parked_pids
from rune.cli.devstack import free_port, wait_until

from tests.test_audit_e2e import stream_events
from tests.test_metrics_e2e import scrape, value

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


# --- the process suite's behaviours on a Debian container (GNU coreutils, python3) -------

DEBIAN_IMAGE = "rune-test-debian:bookworm"
DEB = "deb"  # its service name
CONSOLE_SIZE_SINCE = (1, 42)


ENGINE_ROUTE = "rune.test.route"  # the label only the engine-route agent adopts
DEB_ENGINE = "deb-engine"  # its service: the same image, every exec through the engine


def _debian_container(docker_engine, service: str, labels: dict[str, str]) -> None:
    created = docker_engine.client.create_container(
        DEBIAN_IMAGE, ["sleep", "infinity"],
        labels={**docker_engine.labels, "rune.namespace": "default", "rune.service": service,
                **labels},
        host_config=docker_engine.client.create_host_config(network_mode="none"))
    docker_engine.client.start(created["Id"])


@pytest.fixture(scope="module")
def debian(docker_stack, docker_engine) -> str:
    """Two containers of the Debian test image: DEB, whose non-TTY execs the agent runs
    through the container's runc, and DEB_ENGINE, adopted by a second agent that sends
    every exec through the engine (direct_exec off). Returns the engine's API version."""
    from docker.errors import ImageNotFound

    try:
        docker_engine.client.inspect_image(DEBIAN_IMAGE)
    except ImageNotFound:
        reason = f"image {DEBIAN_IMAGE} is missing; run tests/images/build-debian-image.sh"
        if os.environ.get("RUNE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"Docker tests are required here (RUNE_REQUIRE_DOCKER=1): {reason}")
        pytest.skip(reason)
    _debian_container(docker_engine, DEB, {})
    _debian_container(docker_engine, DEB_ENGINE, {"rune.agent": "a2", ENGINE_ROUTE: "engine"})
    docker_stack.start_agent("a2", [], {"docker": {
        "enabled": True, "direct_exec": False,
        "match_labels": {**docker_engine.labels, ENGINE_ROUTE: "engine"}}}, wait_running=1)
    wait_until(lambda: "running" in _states(docker_stack, DEB).values(), "debian adopted")
    return docker_engine.client.version()["ApiVersion"]


@pytest.fixture(params=[DEB, DEB_ENGINE], ids=["runc", "engine"])
def deb(request, debian) -> str:
    """The Debian service to run a non-TTY behaviour on: once per exec route."""
    return request.param


def _py(code: str) -> list[str]:
    return ["python3", "-c", code]


def _spawn_tty(stack, *command: str, rows: int = 33, cols: int = 101,
               service: str = DEB) -> pexpect.spawn:
    env = {**os.environ, "RUNE_CONFIG": str(Path(stack.state_dir) / "none.yaml")}
    return pexpect.spawn(sys.executable, ["-m", "rune.cli.main", "exec", "--api-server",
                                          stack.api_address, "-t", service, *command],
                         cwd=str(ROOT), env=env, dimensions=(rows, cols), timeout=30)


def test_debian_exit_codes_and_signal_death(rune, deb):
    """The command's exit code is the CLI's; death by SIGKILL is 137."""
    assert rune("exec", deb, *_py("import sys; sys.exit(7)")).returncode == 7
    assert rune("exec", deb, *_py("import os; os.kill(os.getpid(), 9)")).returncode == 137
    assert rune("exec", deb, "true").returncode == 0


def test_debian_missing_and_unexecutable_commands(rune, deb):
    """Missing: 127; not executable or a missing workdir: 126; each with a message."""
    missing = rune("exec", deb, "no-such-command-xyz")
    assert missing.returncode == 127 and b"no-such-command-xyz" in missing.stderr
    assert rune("exec", deb, "/etc/passwd").returncode == 126
    workdir = rune("exec", "--workdir", "/no/such/dir", deb, "pwd")
    assert workdir.returncode == 126 and b"/no/such/dir" in workdir.stderr


def test_debian_stderr_stays_apart_under_volume(rune, deb):
    """Megabytes written to stdout and stderr in turns arrive apart and byte-exact."""
    code = ("import os\nfor i in range(64):\n"
            "    os.write(1, b'o' * 65536)\n    os.write(2, bytes([97 + i % 26]) * 40000)\n")
    result = rune("exec", deb, *_py(code), timeout=120)
    assert result.returncode == 0
    assert result.stdout == b"o" * 65536 * 64
    assert result.stderr == b"".join(bytes([97 + i % 26]) * 40000 for i in range(64))


def test_debian_stdin_eof_half_closes(rune, deb):
    """stdin's EOF reaches the command, whose output after it still comes back."""
    code = ("import sys, hashlib\ndata = sys.stdin.buffer.read()\n"
            "print(len(data), hashlib.sha256(data).hexdigest())\nprint('after eof')")
    data = os.urandom(300_000)
    result = rune("exec", deb, *_py(code), input=data)
    expected = f"{len(data)} {hashlib.sha256(data).hexdigest()}\nafter eof\n".encode()
    assert result.stdout == expected and result.returncode == 0


def test_debian_env_and_workdir(rune, deb):
    """--env adds variables (values may hold '='), --workdir sets the directory."""
    result = rune("exec", "--env", "A=1", "--env", "B=x=y", "--workdir", "/usr/share", deb,
                  *_py("import os; print(os.environ['A'], os.environ['B'], os.getcwd())"))
    assert result.stdout == b"1 x=y /usr/share\n"


def test_debian_trailing_output_is_kept(rune, deb):
    """GNU head's 3 MB written right before exit all arrive, with the exit code."""
    result = rune("exec", deb, "sh", "-c", "head -c 3000000 /dev/zero; exit 3")
    assert len(result.stdout) == 3_000_000 and result.returncode == 3


def test_debian_50mb_stdin_round_trip(rune, deb):
    """50 MB of random bytes through cat come back unchanged, and sha256sum inside agrees."""
    data = os.urandom(50 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    echoed = rune("exec", deb, "cat", input=data, timeout=180)
    assert echoed.returncode == 0 and hashlib.sha256(echoed.stdout).hexdigest() == digest
    inside = rune("exec", deb, "sha256sum", input=data, timeout=180)
    assert inside.stdout.split()[0].decode() == digest


def test_debian_tty_size_from_the_first_byte(docker_stack, debian, deb):
    """Engines with API >= 1.42 get the size at create: the command's first look sees it."""
    if tuple(int(x) for x in debian.split(".")) < CONSOLE_SIZE_SINCE:
        pytest.skip(f"Engine API {debian} takes no ConsoleSize at exec create (1.42+); the "
                    "size follows the start, as with docker exec -t")
    child = _spawn_tty(docker_stack, "stty", "size", service=deb)
    try:
        child.expect(r"33 101")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


def test_debian_tty_size_is_set_before_the_first_keystroke(docker_stack, debian, deb):
    """Even where the size follows the start, it is in place before any input arrives."""
    child = _spawn_tty(docker_stack, *_py(
        "import os, sys; sys.stdin.readline(); s = os.get_terminal_size(); "
        "print('size', s.lines, s.columns)"), service=deb)
    try:
        child.sendline("go")
        child.expect(r"size 33 101")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


def test_debian_tty_resize_reaches_the_command(docker_stack, debian, deb):
    """A local resize becomes SIGWINCH and the new size in the container."""
    child = _spawn_tty(docker_stack, *_py(
        "import os, signal, sys\n"
        "def show(*_):\n    s = os.get_terminal_size(); print('now', s.lines, s.columns, "
        "flush=True)\n"
        "signal.signal(signal.SIGWINCH, show)\nprint('ready', flush=True)\n"
        "sys.stdin.readline()"), service=deb)
    try:
        child.expect("ready")
        child.setwinsize(47, 133)
        child.expect(r"now 47 133")
        child.sendline("")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


def test_debian_signal_reaches_a_python_handler(rune, deb):
    """SIGTERM to the CLI reaches the command's handler, whose exit code comes back."""
    code = ("import signal, sys, time\n"
            "def done(*_):\n    print('got TERM', flush=True); sys.exit(3)\n"
            "signal.signal(signal.SIGTERM, done)\nprint('ready', flush=True)\n"
            "while True: time.sleep(0.1)")
    proc = rune.popen("exec", deb, *_py(code), stdout=subprocess.PIPE,
                      stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.read() == b"got TERM\n"
        assert proc.wait(timeout=30) == 3
    finally:
        proc.kill()
        proc.wait()


def test_debian_timeout_kills_the_command(rune, deb):
    """--timeout ends with 124 and the command is gone from the host's process table."""
    marker = f"rune-timeout-{os.getpid()}-{time.monotonic_ns()}"
    result = rune("exec", deb, "--timeout", "1s", *_py("import time; time.sleep(60)"), marker)
    assert result.returncode == 124 and "timed out" in result.stderr.decode()
    wait_until(lambda: subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout
               == b"", "the timed-out command gone", timeout=10)


def _container_of(docker_engine, service: str) -> str:
    found = docker_engine.client.containers(filters={"label": [
        f"{k}={v}" for k, v in {**docker_engine.labels, "rune.service": service}.items()]})
    assert len(found) == 1
    return found[0]["Id"]


def test_debian_route_is_runc_or_engine(rune, deb, docker_engine):
    """Through runc the engine holds no exec for the command; through the engine it does."""
    cid = _container_of(docker_engine, deb)
    proc = rune.popen("exec", deb, "sh", "-c", "echo ready; exec sleep 60",
                      stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == b"ready\n"
        execs = docker_engine.client.inspect_container(cid).get("ExecIDs") or []
        assert len(execs) == (0 if deb == DEB else 1)
    finally:
        proc.kill()
        proc.wait()


def test_debian_tty_route_is_runc_or_engine(docker_stack, docker_engine, debian, deb):
    """Under a TTY too, on an engine that cannot size the terminal at create (API < 1.42),
    the runc route holds no engine exec; where it can, the engine keeps TTY execs."""
    cid = _container_of(docker_engine, deb)
    child = _spawn_tty(docker_stack, "sh", "-c", "echo ready; exec sleep 60", service=deb)
    try:
        child.expect("ready")
        execs = docker_engine.client.inspect_container(cid).get("ExecIDs") or []
        sized_at_create = tuple(int(x) for x in debian.split(".")) >= CONSOLE_SIZE_SINCE
        assert len(execs) == (0 if deb == DEB and not sized_at_create else 1)
    finally:
        child.close(force=True)


def test_debian_tty_keys_exit_codes_and_failures(docker_stack, deb):
    """Ctrl+C typed reaches the foreground program in the container (a trap says so), the
    exit code comes back, the terminal translates as a terminal does, and a missing
    command or workdir is 127/126 with rune's message on either route."""
    child = _spawn_tty(docker_stack, "sh", "-c",
                       "trap 'echo got-INT; exit 9' INT; echo ready; "
                       "while :; do sleep 0.1; done", service=deb)
    try:
        child.expect("ready\r\n")
        child.sendintr()
        child.expect("got-INT")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 9
    child = _spawn_tty(docker_stack, "no-such-command-xyz", service=deb)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 127 and b"no-such-command-xyz" in child.before
    assert b"exec failed" not in child.before
    child = _spawn_tty(docker_stack, "--workdir", "/no/such", "pwd", service=deb)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 126 and b"/no/such" in child.before


def test_debian_tty_signal_death_timeout_and_no_zombies(docker_stack, deb):
    """Under a TTY: death by a signal is 128+N, --timeout kills the command (gone from the
    host's process table), and the agent leaves nothing unreaped behind its TTY execs."""
    child = _spawn_tty(docker_stack, "sh", "-c", "kill -TERM $$", service=deb)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 143
    marker = f"rune-tty-timeout-{os.getpid()}-{time.monotonic_ns()}"
    child = _spawn_tty(docker_stack, "--timeout", "1s", *_py("import time; time.sleep(60)"),
                       marker, service=deb)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 124 and b"timed out" in child.before
    wait_until(lambda: subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout
               == b"", "the timed-out command gone", timeout=10)
    for _ in range(5):
        quick = _spawn_tty(docker_stack, "true", service=deb)
        quick.expect(pexpect.EOF)
        quick.close()
        assert quick.exitstatus == 0
    wait_until(lambda: not agent_zombies(), "no zombie under an agent", timeout=10)


def test_debian_tty_runc_flags_cannot_be_smuggled(docker_stack, debian):
    """Under a TTY too, argv and env that look like runc's flags (its console socket, its
    PID file, detach) stay the command's own words; the next TTY exec works."""
    child = _spawn_tty(docker_stack, "--env", "X=--console-socket=/tmp/rune-evil", "--",
                       "--pid-file=/etc/x", "-d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 127 and b'"--pid-file=/etc/x"' in child.before
    assert not Path("/etc/x").exists() and not Path("/tmp/rune-evil").exists()
    child = _spawn_tty(docker_stack, "--env", "X=--console-socket=/tmp/rune-evil", "sh", "-c",
                       'printf "%s|" "$X" "$0"', "--detach")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and child.before == b"--console-socket=/tmp/rune-evil|--detach|"


CONFINEMENT = ("grep -E '^(Cap|Seccomp|NoNewPrivs)' /proc/self/status; id; "
               "for ns in pid mnt net ipc uts cgroup; do "
               "[ \"$(readlink /proc/self/ns/$ns)\" = \"$(readlink /proc/1/ns/$ns)\" ] "
               "&& echo \"$ns joined\"; done; "
               "[ \"$(cat /proc/self/cgroup)\" = \"$(cat /proc/1/cgroup)\" ] && echo cgroup same")


def test_debian_runc_exec_is_as_confined_as_the_engines(rune, debian):
    """The same capabilities, seccomp filter, user, namespaces and cgroup on both routes."""
    direct = rune("exec", DEB, "sh", "-c", CONFINEMENT)
    engine = rune("exec", DEB_ENGINE, "sh", "-c", CONFINEMENT)
    assert direct.returncode == 0 and direct.stdout == engine.stdout
    lines = direct.stdout.decode().splitlines()
    assert "Seccomp:\t2" in lines and "cgroup same" in lines
    assert {f"{ns} joined" for ns in ("pid", "mnt", "net", "ipc", "uts", "cgroup")} <= set(lines)
    bounding = int(next(v for v in lines if v.startswith("CapBnd:")).split()[1], 16)
    assert bounding & (1 << 21) == 0  # CAP_SYS_ADMIN stays dropped, as for the container


def test_debian_runc_flags_cannot_be_smuggled(rune, debian):
    """argv and env that look like runc's flags stay the command's own words."""
    result = rune("exec", "--env", "X=--root=/", DEB, "--", "--pid-file=/etc/x", "-d")
    assert result.returncode == 127 and b'"--pid-file=/etc/x"' in result.stderr
    assert not Path("/etc/x").exists()
    echoed = rune("exec", "--env", "X=--root=/", DEB, "sh", "-c", 'printf %s "$X"', "--help")
    assert echoed.stdout == b"--root=/" and echoed.returncode == 0


def test_debian_command_saying_exec_failed_is_not_taken_for_runc(rune, debian):
    """runc's start-failure words printed by the command itself stay its own output, and a
    command that goes on writing stderr after them is not stalled (it fills its pipe)."""
    said = rune("exec", DEB, "sh", "-c", 'echo "exec failed: mine" >&2; exit 255')
    assert said.returncode == 255 and said.stderr == b"exec failed: mine\n"
    more = rune("exec", DEB, "sh", "-c",
                'echo "exec failed: mine" >&2; head -c 300000 /dev/zero >&2; echo done',
                timeout=60)
    assert more.returncode == 0 and more.stdout == b"done\n"
    assert more.stderr == b"exec failed: mine\n" + b"\0" * 300000


def test_debian_paused_container_refuses_and_recovers(rune, deb, docker_stack,
                                                      docker_engine):
    """A paused container refuses an exec plainly; unpaused, the next exec works."""
    cid = _container_of(docker_engine, deb)
    docker_engine.client.pause(cid)
    try:
        wait_until(lambda: "stopped" in _states(docker_stack, deb).values(), "paused seen")
        refused = rune("exec", deb, "true")
        assert refused.returncode == 255 and refused.stderr.startswith(b"Error: ")
        assert b"not running" in refused.stderr
    finally:
        docker_engine.client.unpause(cid)
    wait_until(lambda: "running" in _states(docker_stack, deb).values(), "unpaused seen")
    assert rune("exec", deb, "echo", "back").stdout == b"back\n"


def test_debian_exec_into_a_removed_container_and_the_agent_lives_on(rune, docker_stack,
                                                                     docker_engine, debian):
    """A container removed behind the agent's back refuses execs; the others still work."""
    cid = docker_engine.run({"rune.namespace": "default", "rune.service": "doomed"})
    wait_until(lambda: "running" in _states(docker_stack, "doomed").values(), "adopted")
    docker_engine.client.remove_container(cid, force=True)
    result = rune("exec", "doomed", "true")
    assert result.returncode == 255 and result.stderr.startswith(b"Error: ")
    assert rune("exec", DEB, "echo", "still here").stdout == b"still here\n"


def _pid_namespace(docker_engine, service: str) -> str:
    cid = _container_of(docker_engine, service)
    return os.readlink(f"/proc/{docker_engine.client.inspect_container(cid)['State']['Pid']}"
                       "/ns/pid")


def _parked_pids_in(namespace: str) -> list[int]:
    """The host PIDs of the starts parked now in the container of that PID namespace."""
    found = []
    for pid in parked_pids():
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == namespace:
                found.append(pid)
        except OSError:
            pass
    return found


def _parked_in(docker_engine, service: str, other_than: int = 0) -> int:
    """The host PID of the start parked in the service's container (waited for)."""
    namespace = _pid_namespace(docker_engine, service)
    found: list[int] = []

    def look() -> bool:
        found[:] = [p for p in _parked_pids_in(namespace) if p != other_than]
        return bool(found)

    wait_until(look, f"a start parked in {service}")
    return found[0]


def _inner_pid(pid: int) -> int:
    """pid as the container sees it."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("NSpid:")).split()[-1])


def test_debian_exec_takes_the_parked_start(rune, debian, docker_engine):
    """After an exec, the container's next start is made ahead by runc and waits there
    (rune-parked, run from the agent's memfd); the next exec becomes that very process,
    scheduled as any command (it was parked idle), and another is parked after it."""
    assert rune("exec", DEB, "true").returncode == 0
    pid = _parked_in(docker_engine, DEB)
    assert os.readlink(f"/proc/{pid}/exe").startswith("/memfd:rune-parked")
    inner = _inner_pid(pid)
    result = rune("exec", DEB, *_py("import os; print(os.getpid(), os.sched_getscheduler(0))"))
    assert result.returncode == 0
    assert result.stdout.split() == [str(inner).encode(), b"0"]  # SCHED_OTHER
    assert _parked_in(docker_engine, DEB, other_than=pid) != pid


PROBE = ["--env", "HOME=/override", "--env", "NEW=1", "--workdir", "/tmp", DEB, "sh", "-c",
         "env | grep -v '^PWD=' | sort; pwd; umask; " + CONFINEMENT]


def test_debian_parked_and_runc_started_commands_are_alike(rune, debian, docker_engine):
    """The same environment (overrides winning), directory, umask, user, capabilities,
    seccomp filter, namespaces and cgroup whether a parked start or runc itself starts
    the command."""
    rune("exec", DEB, "true")
    _parked_in(docker_engine, DEB)
    parked = rune("exec", *PROBE)
    again = _parked_in(docker_engine, DEB)
    os.kill(again, signal.SIGKILL)  # from the host: the next exec finds none and runs runc
    wait_until(lambda: not os.path.exists(f"/proc/{again}"), "the parked start reaped")
    started_by_runc = rune("exec", *PROBE)
    assert parked.returncode == started_by_runc.returncode == 0
    assert parked.stdout == started_by_runc.stdout
    lines = parked.stdout.decode().splitlines()
    assert "HOME=/override" in lines and "NEW=1" in lines and "/tmp" in lines
    assert "Seccomp:\t2" in lines and "cgroup same" in lines


ATTACK = """
import errno, os, signal, sys, time
mode, me = sys.argv[1], os.getpid()
deadline = time.time() + 20
while time.time() < deadline:
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{entry}/comm").read().strip() != "rune-parked":
                continue
        except OSError:
            continue
        pid = int(entry)
        if mode == "write":
            for flags in (os.O_WRONLY, os.O_RDWR | os.O_TRUNC):
                try:
                    os.close(os.open(f"/proc/{pid}/exe", flags))
                    print("opened", flush=True)
                except OSError as exc:
                    print("refused", errno.errorcode[exc.errno], flush=True)
        else:
            os.kill(pid, signal.SIGSTOP if mode == "stop" else signal.SIGKILL)
            print(mode, pid, flush=True)
        sys.exit(0)
    time.sleep(0.01)
sys.exit(3)
"""


@pytest.mark.parametrize("mode", ["write", "kill", "stop"])  # stop last: parking then rests
def test_debian_parked_start_tampered_with_from_inside(rune, debian, docker_engine,
                                                        docker_stack, mode):
    """Root in the container goes for the next parked start: its program cannot be
    rewritten (a sealed memfd), and one stopped or killed costs the next exec nothing but
    runc's start (at most the 2 s answer wait): the command runs once, with its output,
    the stack stays healthy and audited, and no zombie is left."""
    attacker = rune("exec", DEB, *_py(ATTACK), mode, timeout=60)
    assert attacker.returncode == 0, attacker.stderr
    if mode == "write":
        assert attacker.stdout.split() == [b"refused", b"ETXTBSY", b"refused", b"ETXTBSY"] \
            or b"opened" not in attacker.stdout
    mark = f"after-{mode}"
    result = rune("exec", DEB, "sh", "-c", f"echo {mark} >> /tmp/ran; cat /tmp/ran")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines().count(mark) == 1  # ran once, not retried
    assert rune("exec", DEB, "echo", "still here").stdout == b"still here\n"
    events = stream_events(docker_stack.nats_url)
    assert any(e.get("event") == "session.ended" and mark in " ".join(e.get("argv", []))
               for e in events)
    wait_until(lambda: not agent_zombies(), "no zombies under the agents")


def test_parked_starts_leave_with_their_agent(docker_stack, docker_engine, debian):
    """An agent that stops lets its parked starts go; one killed outright too (their
    socket's end closes with it): no rune-parked is left in the container either way."""
    service = "deb-parked-agent"
    _debian_container(docker_engine, service, {"rune.agent": "a3", ENGINE_ROUTE: "a3"})
    config = {"docker": {"enabled": True,
                         "match_labels": {**docker_engine.labels, ENGINE_ROUTE: "a3"}}}
    rune = Rune(docker_stack)
    for how in (signal.SIGTERM, signal.SIGKILL):
        agent = docker_stack.start_agent("a3", [], config, wait_running=1)
        assert rune("exec", service, "true").returncode == 0
        pid = _parked_in(docker_engine, service)
        agent.send_signal(how)
        agent.wait(timeout=30)
        wait_until(lambda gone=pid: not os.path.exists(f"/proc/{gone}"),
                   f"parked start gone ({how.name})")
        docker_stack.procs.pop("agent-a3", None)
    assert rune("exec", DEB, "echo", "still here").stdout == b"still here\n"


def test_parked_start_is_let_go_when_unused_and_none_when_off(docker_stack, docker_engine,
                                                              debian):
    """docker.parked_idle: an unused parked start leaves the container after that long;
    docker.parked_starts: false parks nothing (every exec starts runc). The agent counts
    each container exec by how it started (rune_agent_container_exec_starts)."""
    service = "deb-parked-idle"
    _debian_container(docker_engine, service, {"rune.agent": "a4", ENGINE_ROUTE: "a4"})
    rune = Rune(docker_stack)
    labels = {**docker_engine.labels, ENGINE_ROUTE: "a4"}
    for settings in ({"parked_idle": 1.0}, {"parked_starts": False}):
        port = free_port()
        agent = docker_stack.start_agent("a4", [], {
            "metrics_listen": f"127.0.0.1:{port}",
            "docker": {"enabled": True, "match_labels": labels, **settings}}, wait_running=1)

        def starts(route: str, port: int = port) -> float:
            samples = scrape(f"http://127.0.0.1:{port}/metrics")
            return value(samples, "rune_agent_container_exec_starts_total", route=route)

        try:
            assert rune("exec", service, "echo", "ok").stdout == b"ok\n"
            if "parked_idle" in settings:
                pid = _parked_in(docker_engine, service)
                assert rune("exec", service, "echo", "again").stdout == b"again\n"
                assert (starts("runc"), starts("parked"), starts("engine")) == (1, 1, 0)
                pid = _parked_in(docker_engine, service, other_than=pid)
                wait_until(lambda gone=pid: not os.path.exists(f"/proc/{gone}"),
                           "the unused parked start let go", timeout=10)
            else:
                assert rune("exec", service, "echo", "again").stdout == b"again\n"
                # Parking on, one would be there within ~0.1 s: watch a whole second.
                namespace = _pid_namespace(docker_engine, service)
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    assert _parked_pids_in(namespace) == []
                    time.sleep(0.02)
                assert rune("exec", service, "true").returncode == 0
                assert (starts("runc"), starts("parked"), starts("engine")) == (3, 0, 0)
        finally:
            agent.terminate()
            agent.wait(timeout=30)
            docker_stack.procs.pop("agent-a4", None)
    assert not agent_zombies()


def test_engine_client_speaks_to_the_real_engine(docker_engine):
    """The exec client negotiates the API, keeps connections alive and reports HTTP errors."""
    from rune.agent.runners.engine_api import EngineAPI, EngineError, engine_url
    from rune.agent.runners.engine_stream import start_exec

    cid = docker_engine.run({"rune.namespace": "default", "rune.service": "client"})

    async def run() -> None:
        api = EngineAPI(engine_url(None))
        try:
            await api.negotiate()
            assert api.version == docker_engine.client.version()["ApiVersion"]
            exec_id = await api.exec_create(cid, {"Cmd": ["sh", "-c", "echo hi; echo oops >&2"],
                                                  "AttachStdout": True, "AttachStderr": True})
            stream = await start_exec(api, exec_id, tty=False)
            assert await stream.stdout.read(100) == b"hi\n"
            assert await stream.stderr.read(100) == b"oops\n"
            await stream.ended
            assert (await api.exec_inspect(exec_id))["ExitCode"] == 0
            assert len(api._idle) == 1  # create and inspect shared one kept-alive connection
            with pytest.raises(EngineError) as missing:
                await api.exec_create("no-such-container-xyz", {"Cmd": ["true"]})
            assert missing.value.status == 404
            with pytest.raises(EngineError):
                await start_exec(api, "0" * 64, tty=False)
        finally:
            api.close()

    asyncio.run(run())
