"""The multiplexer: warm channels behind the real `rune` CLI, and how it stays safe."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from conftest import ROOT, Rune, mux_pid, stop_mux
from rune.cli import muxwire
from rune.cli.devstack import DEV_USER, Stack, free_port

TOKEN_SERVICES = [{"name": "api", "namespace": "default", "replicas": 1,
                   "command": ["sh", "-c", "exec sleep 2147483647"]}]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait(check: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.02)


def _status(rune: Rune) -> str:
    return rune("mux", "status").stdout.decode()


@pytest.fixture(scope="module")
def mrune(stack) -> Rune:
    return Rune(stack, mux="on")


def test_exec_through_the_mux_keeps_streams_and_exit_code(mrune, own_mux_dir):
    """Output, stderr and the exit status are the same through the multiplexer."""
    result = mrune("exec", "api", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
    pid = mux_pid(own_mux_dir)
    assert pid and _alive(pid)
    again = mrune("exec", "api", "sh", "-c", "cat; exit 3", input=b"piped stdin")
    assert (again.returncode, again.stdout) == (3, b"piped stdin")
    assert mux_pid(own_mux_dir) == pid  # the same multiplexer served both
    status = _status(mrune)
    assert f"pid {pid}" in status and "1 warm channel" in status


def test_socket_directory_is_private(mrune, own_mux_dir):
    """Socket directory 0700, socket 0600, both owned by the user."""
    mrune("exec", "api", "true")
    folder, sock = os.stat(own_mux_dir), os.stat(muxwire.socket_path(own_mux_dir))
    assert folder.st_mode & 0o777 == 0o700 and sock.st_mode & 0o777 == 0o600
    assert folder.st_uid == sock.st_uid == os.getuid()


def test_open_socket_directory_is_refused_and_the_command_runs_here(mrune, tmp_path):
    """A directory others may enter is not used; the command still runs, in-process."""
    folder = tmp_path / "open"
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)
    env = {**mrune.env, "RUNE_MUX_DIR": str(folder)}
    result = subprocess.run(mrune.argv("exec", "api", "echo", "here"), capture_output=True,
                            env=env, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and result.stdout == b"here\n"
    assert b"not using the multiplexer" in result.stderr and b"chmod 700" in result.stderr
    assert not Path(muxwire.socket_path(str(folder))).exists()


@pytest.mark.parametrize("garbage", [
    muxwire.HEADER.pack(5) + b"zzzzz",  # an unknown tag
    muxwire.HEADER.pack(9) + b"d99999:s1",  # a count past its end
    muxwire.HEADER.pack(muxwire.MAX_MESSAGE + 1),  # oversized, announced
    b"l1:" * 1000,  # no header at all: read as a huge length
    muxwire.encode({"t": "hello", "version": "x"})[:-3],  # cut short, then gone
])
def test_malformed_messages_leave_the_mux_serving(mrune, own_mux_dir, garbage):
    """A client that sends garbage is dropped (and logged); the multiplexer keeps serving,
    the same process, and the next command through it works."""
    mrune("exec", "api", "true")
    pid = mux_pid(own_mux_dir)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(muxwire.socket_path(own_mux_dir))
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(4096) == b""  # dropped without an answer
    result = mrune("exec", "api", "echo", "still")
    assert (result.returncode, result.stdout) == (0, b"still\n")
    assert mux_pid(own_mux_dir) == pid and _alive(pid)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_another_user_is_refused_by_peer_credentials(mrune, own_mux_dir):
    """Even with the socket made reachable, a peer of another uid gets nothing."""
    mrune("exec", "api", "true")
    path = muxwire.socket_path(own_mux_dir)
    os.chmod(own_mux_dir, 0o711)
    os.chmod(path, 0o666)
    try:
        child = os.fork()
        if child == 0:  # as nobody: connect, ask for the status, expect the door shut
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(10)
                    sock.connect(path)
                    try:
                        sock.sendall(muxwire.encode({"t": "status"}))
                        code = 0 if sock.recv(4096) == b"" else 1
                    except (ConnectionResetError, BrokenPipeError):
                        code = 0  # shut before it could even ask
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.chmod(own_mux_dir, 0o700)
    assert mrune("exec", "api", "echo", "still").stdout == b"still\n"


def test_off_switches_run_in_process(stack, tmp_path, own_mux_dir):
    """--no-mux, RUNE_MUX=off and `mux: off` in the config start no multiplexer."""
    config = tmp_path / "config.yaml"
    config.write_text("mux: off\n")
    cases = [(Rune(stack, mux="on"), ["--no-mux"]), (Rune(stack, mux="off"), []),
             (Rune(stack, env={"RUNE_CONFIG": str(config)}, mux="on"), [])]
    for rune, flags in cases:
        argv = rune.argv("exec", "api", "echo", "x")
        argv[3:3] = flags  # after `-m rune.cli.main`
        result = subprocess.run(argv, capture_output=True, env=rune.env, timeout=60, cwd=ROOT,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0 and result.stdout == b"x\n", result.stderr
        assert mux_pid(own_mux_dir) is None


def test_token_is_read_on_every_command(tmp_path):
    """A rotated, broken or removed token counts at once, multiplexer or not."""
    stack = Stack(tmp_path / "secure", nats_port=free_port(), api_port=free_port())
    stack.secure(["a1"])
    try:
        stack.start_nats()
        stack.start_apiserver()
        stack.start_agent("a1", TOKEN_SERVICES)
        token_file = tmp_path / "token"
        shutil.copy(stack.token_files[DEV_USER], token_file)
        os.chmod(token_file, 0o600)
        rune = Rune(stack, env={"RUNE_TOKEN_FILE": str(token_file)}, mux="on")
        assert rune("exec", "api", "echo", "ok").stdout == b"ok\n"
        token_file.write_text("not-a-token\n")
        refused = rune("exec", "api", "echo", "ok")
        assert refused.returncode == 255
        assert refused.stderr.decode().startswith("Error: authentication failed")
        token_file.unlink()
        missing = rune("exec", "api", "echo", "ok")
        assert missing.returncode == 255 and b"cannot read token file" in missing.stderr
        shutil.copy(stack.token_files[stack.admin], token_file)
        os.chmod(token_file, 0o600)
        assert rune("exec", "api", "echo", "back").stdout == b"back\n"
    finally:
        stack.stop()


def test_relative_paths_are_the_clients(stack, tmp_path, own_mux_dir):
    """--token-file and RUNE_CONFIG relative to the client's cwd, not the multiplexer's."""
    (tmp_path / "config.yaml").write_text(f"api_server: {stack.api_address}\n")
    env = {**Rune(stack, mux="on").env, "RUNE_CONFIG": "config.yaml"}
    argv = [sys.executable, "-m", "rune.cli.main", "exec", "api", "pwd"]
    result = subprocess.run(argv, capture_output=True, env=env, timeout=60, cwd=tmp_path,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert mux_pid(own_mux_dir) is not None
    missing = subprocess.run([*argv[:4], "--token-file", "nope.token", *argv[4:]],
                             capture_output=True, env=env, timeout=60, cwd=tmp_path,
                             stdin=subprocess.DEVNULL)
    assert missing.returncode == 255
    assert f"cannot read token file {tmp_path}/nope.token".encode() in missing.stderr


def test_killed_mux_ends_the_session_with_255(mrune, own_mux_dir):
    """kill -9 of the multiplexer mid-session: exit 255 and one Error line, no hang."""
    proc = mrune.popen("exec", "api", "sh", "-c", "echo started; exec sleep 100",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == b"started\n"
        os.kill(mux_pid(own_mux_dir), signal.SIGKILL)
        assert proc.wait(timeout=15) == 255
        err = proc.stderr.read().decode()
        assert err.startswith("Error: lost the connection to the rune multiplexer"), err
    finally:
        proc.kill()
        proc.wait()
    # The next command starts a new multiplexer and works.
    assert mrune("exec", "api", "echo", "again").stdout == b"again\n"


def test_client_killed_ends_its_session(mrune, own_mux_dir):
    """kill -9 of the client: the multiplexer ends that session and the command dies."""
    marker = f"rune-mux-client-{os.getpid()}-{time.monotonic_ns()}"
    proc = mrune.popen("exec", "api", "sh", "-c", "echo started; sleep 100; :", marker,
                       stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout.readline() == b"started\n"
    assert "1 session(s)" in _status(mrune)
    proc.kill()
    proc.wait()
    _wait(lambda: "0 session(s)" in _status(mrune), "the session ending")
    _wait(lambda: subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout == b"",
          "the remote command ending")


def test_signals_are_relayed_to_the_remote_command(mrune):
    """SIGTERM to the client reaches the remote trap; its exit status comes back."""
    proc = mrune.popen("exec", "api", "sh", "-c",
                       "trap 'echo got TERM; exit 7' TERM; echo ready; sleep 100 & wait",
                       stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 7
        assert proc.stdout.read() == b"got TERM\n"
    finally:
        proc.kill()
        proc.wait()


def test_suspend_and_continue(mrune):
    """SIGTSTP stops the client (after the multiplexer paused its stdin); SIGCONT resumes."""
    proc = mrune.popen("exec", "api", "sh", "-c", "echo ready; read line; echo got $line",
                       stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTSTP)
        _wait(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
              == "T", "the client stopping")
        proc.send_signal(signal.SIGCONT)
        proc.stdin.write(b"hello\n")
        proc.stdin.close()
        assert proc.wait(timeout=15) == 0
        assert proc.stdout.read() == b"got hello\n"
    finally:
        proc.kill()
        proc.wait()


def test_idle_mux_exits(stack, own_mux_dir):
    """After RUNE_MUX_IDLE seconds without a session the multiplexer exits by itself."""
    rune = Rune(stack, env={"RUNE_MUX_IDLE": "1"}, mux="on")
    assert rune("exec", "api", "true").returncode == 0
    pid = mux_pid(own_mux_dir)
    assert pid is not None
    _wait(lambda: not _alive(pid), "the idle exit")
    assert not Path(muxwire.socket_path(own_mux_dir)).exists()


def test_mux_of_another_install_is_replaced(stack, own_mux_dir):
    """A multiplexer reporting another install steps aside; a current one takes over."""
    old = Rune(stack, env={"RUNE_MUX_BUILD_ID": "0.0.1+old"}, mux="on")
    assert old("exec", "api", "true").returncode == 0
    old_pid = mux_pid(own_mux_dir)
    current = Rune(stack, mux="on")
    assert current("exec", "api", "echo", "new").stdout == b"new\n"
    new_pid = mux_pid(own_mux_dir)
    assert new_pid and new_pid != old_pid
    _wait(lambda: not _alive(old_pid), "the old multiplexer exiting")


def test_mux_of_an_older_encoding_is_left_alone(mrune, own_mux_dir):
    """A multiplexer of an earlier message encoding listens under another socket name: a
    current client neither speaks to it (it would only drop the connection) nor falls
    back to running in-process, but starts a current one beside it."""
    older = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    older.bind(os.path.join(own_mux_dir, "mux.sock"))  # protocol 1's name
    older.listen(8)
    older.settimeout(0.5)
    try:
        result = mrune("exec", "api", "echo", "current")
        assert (result.returncode, result.stdout, result.stderr) == (0, b"current\n", b"")
        assert mux_pid(own_mux_dir)
        with pytest.raises(TimeoutError):
            older.accept()  # nobody knocked on the old socket
    finally:
        older.close()


def test_status_and_stop(mrune, own_mux_dir):
    """`rune mux status` says none (exit 1), then what runs; `rune mux stop` ends it."""
    none = mrune("mux", "status")
    assert none.returncode == 1 and b"no multiplexer is running" in none.stdout
    mrune("exec", "api", "true")
    pid = mux_pid(own_mux_dir)
    assert mrune("mux", "status").returncode == 0
    stopped = mrune("mux", "stop")
    assert stopped.returncode == 0 and f"pid {pid}".encode() in stopped.stdout
    assert not _alive(pid)
    stop_mux(own_mux_dir)


def test_connection_failure_through_the_mux_has_the_hint(mrune):
    """A dead apiserver address: exit 255, one Error line naming `rune dev up`."""
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "rune.cli.main", "exec", "--api-server",
                             f"127.0.0.1:{port}", "api", "true"], capture_output=True,
                            env=mrune.env, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 255
    err = result.stderr.decode()
    assert err.startswith("Error: failed to create API client: failed to connect")
    assert "rune dev up" in err and err.count("\n") == 1


def test_fast_path_imports_nothing_heavy(mrune):
    """With a warm multiplexer the `rune` process imports no grpc, asyncio, typer, pydantic."""
    mrune("exec", "api", "true")
    argv = mrune.argv("exec", "api", "true")
    result = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True,
                            env=mrune.env, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in result.stderr.decode().splitlines() if "import time:" in line}
    assert "_socket" in imported
    assert not imported & {"grpc", "asyncio", "typer", "pydantic", "yaml", "click", "typing",
                            "selectors"}


def test_usage_errors_and_help_through_the_mux(mrune):
    """Parse-time endings (usage error, help) come back whole, every time (exit 2 / 0)."""
    mrune("exec", "api", "true")
    for _ in range(5):
        bad = mrune("exec", "--timeout", "banana", "api", "true")
        assert bad.returncode == 2 and b"invalid duration 'banana'" in bad.stderr
    shown = mrune("exec", "--help")
    assert shown.returncode == 0 and b"Usage: rune exec [OPTIONS] TARGET COMMAND..." in \
        shown.stdout


@pytest.mark.parametrize("mux", ["on", "off"])
def test_background_job_leaves_the_terminal_to_the_shell(stack, own_mux_dir, mux):
    """`rune exec … &` in an interactive shell stops for tty input (as ssh and an in-process
    run do) instead of reading the shell's keystrokes; `fg` gives it the terminal."""
    rune = Rune(stack, mux=mux)
    assert rune("exec", "api", "true").returncode == 0  # warm, when there is a multiplexer
    argv = rune.argv("exec", "api", "sh", "-c", "read line; echo got:$line")
    shell = pexpect.spawn("bash", ["--norc", "--noprofile", "-i"], cwd=str(ROOT),
                          env={**rune.env, "PS1": "prompt$ ", "TERM": "dumb"}, timeout=30)
    try:
        shell.expect_exact("prompt$ ")
        shell.sendline(shlex.join(argv) + " &")
        shell.expect_exact("prompt$ ")
        deadline = time.monotonic() + 20
        while True:  # the job stops once it would read the terminal
            shell.sendline("jobs")
            if shell.expect([r"Stopped.*prompt\$ ", r"Running.*prompt\$ "]) == 0:
                break
            assert time.monotonic() < deadline, "the background job never stopped"
            time.sleep(0.2)
        shell.sendline("echo typed:$((6*7))")  # read by the shell, not by the job
        shell.expect_exact("typed:42")
        shell.expect_exact("prompt$ ")
        shell.sendline("fg")
        shell.expect_exact("echo got:$line")  # bash names the job it gives the terminal
        shell.sendline("mine")
        shell.expect_exact("got:mine")
        shell.expect_exact("prompt$ ")
        shell.sendline("echo status:$?")
        shell.expect_exact("status:0")
    finally:
        shell.close(force=True)
    assert rune("exec", "api", "echo", "healthy").stdout == b"healthy\n"


@pytest.mark.parametrize(("text", "off"), [
    ("mux: off\n", True), ("mux: 'off'  # no multiplexer here\n", True), ('mux: "no"\n', True),
    ("mux: auto\n", False), ("contexts:\n  mux: off\n", False), ("muxer: off\n", False),
    ("api_server: h:1\nmux : false\n", True), ("", False),
])
def test_config_switch_is_read_without_a_yaml_parser(tmp_path, text, off):
    """The fast path reads a top-level `mux:` key (quoted, commented) and nothing nested."""
    from rune.cli.entry import use_mux

    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert use_mux(["exec", "api", "true"], {"RUNE_CONFIG": str(config)}) is not off


def test_job_sent_to_the_background_stops_again_for_tty_input(mrune, own_mux_dir):
    """Ctrl+Z then `bg`: the job stops for tty input instead of reading the shell's
    keystrokes through the multiplexer; `fg` gives it the terminal back."""
    assert mrune("exec", "api", "true").returncode == 0
    argv = mrune.argv("exec", "--no-tty", "api", "sh", "-c",
                      "echo ready; read a; echo got:$a")
    shell = pexpect.spawn("bash", ["--norc", "--noprofile", "-i"], cwd=str(ROOT),
                          env={**mrune.env, "PS1": "prompt$ ", "TERM": "dumb"}, timeout=30)
    try:
        shell.expect_exact("prompt$ ")
        shell.sendline(shlex.join(argv))
        shell.expect_exact("ready\r\n")  # the output, not the echo of the command line
        shell.sendcontrol("z")
        shell.expect(r"Stopped.*prompt\$ ")
        shell.sendline("bg")
        shell.expect_exact("prompt$ ")
        deadline = time.monotonic() + 20
        while True:
            shell.sendline("jobs")
            if shell.expect([r"Stopped.*prompt\$ ", r"Running.*prompt\$ "]) == 0:
                break
            assert time.monotonic() < deadline, "the job in the background never stopped"
            time.sleep(0.2)
        shell.sendline("echo typed:$((6*7))")
        shell.expect_exact("typed:42")
        shell.expect_exact("prompt$ ")
        shell.sendline("fg")
        shell.expect_exact("echo got:$a")  # bash names the job it gives the terminal
        shell.sendline("mine")
        shell.expect_exact("got:mine")
    finally:
        shell.close(force=True)
