"""End to end: the real CLI → apiserver → NATS → agent → an instance, and back.

Every scenario runs twice: against process instances and against container instances
(the image is a static busybox, so scenarios use only sh and its applets).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import DOCKER_API_WORKDIR, Rune, agent_zombies
from rune.cli.devstack import wait_until

RUNNERS = ["process", pytest.param("docker", marks=pytest.mark.docker)]


@pytest.fixture(scope="module", params=RUNNERS)
def runner(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def stack(runner, request):
    """The process stack, or the same instances as containers on the real engine."""
    return request.getfixturevalue("docker_stack" if runner == "docker" else "stack")


@pytest.fixture(scope="module")
def rune(stack) -> Rune:
    return Rune(stack)


def test_echo_hello(rune):
    """Output and a zero exit code come back."""
    result = rune("exec", "api", "echo", "hello")
    assert result.stdout == b"hello\n"
    assert result.returncode == 0


def test_command_holds_only_its_stdio(rune):
    """Nothing of the agent's (its broker socket, other sessions' pipes, report pipes)
    reaches the command: only stdio is open in it (ls's own directory aside)."""
    result = rune("exec", "api", "ls", "-l", "/proc/self/fd")
    assert result.returncode == 0, result.stderr
    links = dict(line.split(" -> ")[0].split()[-1:] + line.split(" -> ")[1:]
                 for line in result.stdout.decode().splitlines() if " -> " in line)
    assert {"0", "1", "2"} <= set(links)
    others = {fd: target for fd, target in links.items() if fd not in ("0", "1", "2")}
    assert all(target.startswith("/proc/") for target in others.values()), others


def test_exit_code_is_the_remote_one(rune):
    """The remote exit code becomes the CLI's."""
    assert rune("exec", "api", "sh", "-c", "exit 7").returncode == 7


def test_stderr_stays_separate(rune):
    """Without a TTY, remote stderr goes to local stderr only."""
    result = rune("exec", "api", "sh", "-c", "echo out; echo e >&2")
    assert result.stdout == b"out\n"
    assert result.stderr == b"e\n"


def test_signal_death_is_128_plus_n(rune):
    """A command killed by signal N exits 128+N, as in a shell."""
    assert rune("exec", "api", "sh", "-c", "kill -9 $$").returncode == 137


def test_argv_reaches_the_command_verbatim(rune):
    """No shell joins argv: spaces, quotes, $HOME and empty strings arrive unchanged."""
    words = ["a b", "it's", '"q"', "$HOME", "", "--verbose", "-n", "x"]
    result = rune("exec", "api", "sh", "-c", 'for a; do printf "[%s]" "$a"; done', "_", *words)
    assert result.stdout.decode() == "".join(f"[{word}]" for word in words)


def test_options_after_command_belong_to_it(rune):
    """Everything from COMMAND on is the command's own, rune flags included."""
    result = rune("exec", "api", "sh", "-c", "echo $0 $1", "--verbose", "--timeout")
    assert result.stdout == b"--verbose --timeout\n"
    result = rune("exec", "api", "--", "echo", "-n", "x")
    assert result.stdout == b"x"


def test_instance_id_hits_that_instance(rune):
    """An id containing -instance- targets exactly that instance."""
    for index in (0, 1):
        target = f"api-instance-a1-{index}"
        result = rune("exec", target, "sh", "-c", "echo $RUNE_INSTANCE")
        assert result.stdout.decode().strip() == target


def test_workdir_and_env(rune):
    """--workdir sets the directory; --env adds variables, values may contain '='."""
    assert rune("exec", "api", "--workdir", "/tmp", "pwd").stdout == b"/tmp\n"
    result = rune("exec", "api", "--env", "A=1", "--env", "B=x=y", "sh", "-c",
                  'echo "A=$A"; echo "B=$B"')
    assert result.stdout == b"A=1\nB=x=y\n"


def test_default_workdir_is_the_instance_directory(rune, runner):
    """Without --workdir the command runs in the instance's own directory."""
    result = rune("exec", "api-instance-a1-0", "pwd")
    expected = DOCKER_API_WORKDIR if runner == "docker" else "instances/api-instance-a1-0"
    assert result.stdout.decode().strip().endswith(expected)


def test_stdin_eof_reaches_remote(rune):
    """Piped stdin is forwarded and its EOF ends the remote read."""
    result = rune("exec", "api", "--no-tty", "wc", "-l", input=b"a\nb\n")
    assert result.stdout.strip() == b"2"


def test_50mb_through_cat_byte_exact(rune):
    """50 MB of random bytes go through a remote cat both ways at once, unchanged."""
    data = os.urandom(50 * 1024 * 1024)
    result = rune("exec", "api", "cat", input=data, timeout=120)
    assert result.returncode == 0
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_last_bytes_before_exit_are_kept(rune):
    """Output written right before exit is never cut off."""
    result = rune("exec", "api", "sh", "-c", "head -c 3000000 /dev/zero; exit 3")
    assert len(result.stdout) == 3_000_000
    assert result.returncode == 3


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_200mb_with_a_slow_reader_stays_bounded(rune, stack):
    """200 MB arrive byte-exact through a reader that stalls; servers' memory stays bounded."""
    size = 200 * 1024 * 1024
    expected = hashlib.sha256()
    block = b"0123456789abcde\n" * 4096
    for _ in range(size // len(block)):
        expected.update(block)
    pids = [stack.procs["apiserver"].pid, stack.procs["agent-a1"].pid]
    before = [_rss_kib(p) for p in pids]
    proc = rune.popen("exec", "api", "sh", "-c", f"yes 0123456789abcde | head -c {size}",
                      stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    got = hashlib.sha256()
    received = 0
    peaks = list(before)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        chunk = proc.stdout.read(65536)
        if not chunk:
            break
        got.update(chunk)
        received += len(chunk)
        if 20 * 2**20 < received < 30 * 2**20:
            time.sleep(0.002)  # a slow reader for a while: backpressure reaches the remote
            peaks = [max(p, _rss_kib(pid)) for p, pid in zip(peaks, pids, strict=True)]
    assert proc.wait(timeout=30) == 0
    assert received == size
    assert got.hexdigest() == expected.hexdigest()
    for base, peak in zip(before, peaks, strict=True):
        assert peak - base < 64 * 1024, f"RSS grew by {peak - base} KiB"


def test_unknown_service(rune):
    """An unknown target fails with 255 and the seed's words."""
    result = rune("exec", "nope", "true")
    assert result.returncode == 255
    assert result.stderr.decode().startswith(
        "Error: failed to initialize exec session: instance not found")


def test_unknown_instance_id(rune):
    """An unknown instance id fails the same way, naming the id."""
    result = rune("exec", "api-instance-zz-9", "true")
    assert result.returncode == 255
    assert "instance not found" in result.stderr.decode()
    assert "api-instance-zz-9" in result.stderr.decode()


def test_instance_not_running(rune):
    """A service with no running instance is 'not running', not 'not found'."""
    result = rune("exec", "crashy", "true")
    assert result.returncode == 255
    assert "not running" in result.stderr.decode()


def test_command_not_found_is_127(rune):
    """A missing remote command exits 127 with a message on stderr."""
    result = rune("exec", "api", "no-such-command-xyz")
    assert result.returncode == 127
    assert b"no-such-command-xyz" in result.stderr


def test_command_not_executable_is_126(rune, runner, tmp_path):
    """A remote file without the execute bit exits 126."""
    path = tmp_path / "script.sh"
    path.write_text("#!/bin/sh\necho hi\n")
    path.chmod(0o644)
    target = "/etc/passwd" if runner == "docker" else str(path)  # the image's own 0644 file
    assert rune("exec", "api", target).returncode == 126


def test_timeout_is_124_and_kills_the_command(rune):
    """--timeout ends the session with 124 and the remote process is gone."""
    marker = f"rune-timeout-{os.getpid()}-{time.monotonic_ns()}"
    result = rune("exec", "api", "--timeout", "1s", "sh", "-c", "sleep 60; :", marker)
    assert result.returncode == 124
    assert "timed out" in result.stderr.decode()
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True)
    assert out.stdout == b"", "the remote command survived its timeout"


def test_background_child_does_not_hang_the_session(rune):
    """A background child holding stdout open cannot keep the session alive."""
    start = time.monotonic()
    result = rune("exec", "api", "sh", "-c", "sleep 30 & echo done", timeout=20)
    assert result.returncode == 0
    assert result.stdout == b"done\n"
    assert time.monotonic() - start < 15


def test_what_a_command_leaves_behind_is_reaped(rune, runner):
    """A daemon a command starts out of its group outlives the session; where it is the
    agent's to adopt (a process host), it is reaped once it ends: nothing is left a zombie
    under the agent, and the next exec works."""
    result = rune("exec", "api", "sh", "-c",
                  "setsid sh -c 'sleep 0.5' </dev/null >/dev/null 2>&1 & echo $!")
    assert result.returncode == 0
    daemon = int(result.stdout)
    if runner == "process":  # a host PID: gone from /proc only once reaped
        wait_until(lambda: not os.path.exists(f"/proc/{daemon}"), "the daemon reaped",
                   timeout=10)
    else:  # a PID of the container's: ended (the container's init is its parent there)
        wait_until(lambda: rune("exec", "api", "sh", "-c",
                                f"grep -qs '^State:.*Z' /proc/{daemon}/status || "
                                f"! test -e /proc/{daemon}").returncode == 0,
                   "the daemon ended", timeout=10)
    wait_until(lambda: not agent_zombies(), "no zombie under an agent", timeout=10)
    assert rune("exec", "api", "echo", "next").stdout == b"next\n"


def test_bad_flags_are_usage_errors(rune, stack):
    """Bad flags exit 2 before any connection is attempted."""
    for args in (("--env", "NOEQUALS"), ("--timeout", "banana"), ("--workdir", "rel")):
        result = rune.bare("exec", "--api-server", "127.0.0.1:1", *args, "api", "true")
        assert result.returncode == 2, args
        assert b"failed to connect" not in result.stderr


def test_cannot_connect(rune):
    """An unreachable API server is a rune failure: 255 and the seed's words."""
    result = rune.bare("exec", "--api-server", "127.0.0.1:1", "api", "true")
    assert result.returncode == 255
    assert result.stderr.decode().startswith(
        "Error: failed to create API client: failed to connect to API server")


def test_fifty_concurrent_execs(rune):
    """50 concurrent sessions each get their own output."""
    def one(i: int) -> tuple[int, bytes, int]:
        result = rune("exec", "api", "sh", "-c", f"echo session-{i}; exit {i % 5}")
        return i, result.stdout, result.returncode

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    for i, stdout, code in results:
        assert stdout == f"session-{i}\n".encode()
        assert code == i % 5


def test_instances_table(rune):
    """`rune instances` lists namespace, service, instance, state, host and runner."""
    result = rune("instances")
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == ["NAMESPACE", "SERVICE", "INSTANCE", "STATE", "HOST", "RUNNER"]
    body = "\n".join(lines[1:])
    assert "api-instance-a1-0" in body and "running" in body
    assert "db-instance" not in body  # another namespace
    everything = rune("instances", "-A").stdout.decode()
    assert "db-instance-a1-0" in everything


def test_namespace_flag(rune):
    """-n selects the namespace the target is resolved in."""
    assert rune("exec", "-n", "prod", "db", "true").returncode == 0
    assert rune("exec", "db", "true").returncode == 255


@pytest.mark.parametrize("flag_wins", [False, True])
def test_config_file_fills_missing_flags(rune, stack, tmp_path, flag_wins):
    """~/.config/rune/config.yaml supplies api server and namespace; flags win."""
    config = tmp_path / "config.yaml"
    config.write_text(f"api_server: {stack.api_address}\nnamespace: prod\n")
    args = ["-n", "default", "api", "true"] if flag_wins else ["db", "true"]
    result = rune.bare("exec", *args, env={"RUNE_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
