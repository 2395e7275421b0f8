"""Interactive sessions: the real `rune` CLI driven inside a real local PTY with pexpect."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pexpect
import pytest
from conftest import ROOT, Rune, start_stack
from rune.cli.exec_cmd import Outbox
from rune.cli.terminal import RawMode, decide_tty, wants_tty

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and Linux PTYs")

PROMPT = "RUNE-REMOTE> "
LOCAL_PROMPT = "LOCAL-SHELL> "
# `sleep 100` that says when it is the terminal's foreground job (the job sets that itself
# before it runs), so that a key typed after "started" cannot reach the shell instead.
FOREGROUND_SLEEP = "sh -c 'echo started; exec sleep 100'"
SHORT_HEARTBEAT = {"heartbeat": 0.5, "lost_after": 3}


@pytest.fixture(scope="module")
def tty_stack(tmp_path_factory: pytest.TempPathFactory):
    stack = start_stack(tmp_path_factory.mktemp("tty"), api_extra=SHORT_HEARTBEAT)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def trune(tty_stack) -> Rune:
    return Rune(tty_stack, env={"TERM": "xterm-256color"})


def spawn(rune: Rune, *args: str, rows: int = 30, cols: int = 100,
          env: dict | None = None) -> pexpect.spawn:
    """The CLI as the only program of a fresh local terminal."""
    argv = rune.argv("exec", *args)
    return pexpect.spawn(argv[0], argv[1:], cwd=str(ROOT), env={**rune.env, **(env or {})},
                         dimensions=(rows, cols), timeout=20)


def remote_shell(rune: Rune, *flags: str, **kwargs) -> pexpect.spawn:
    """`rune exec api sh` with a recognisable prompt, ready for commands."""
    child = spawn(rune, *flags, "--env", f"PS1={PROMPT}", "api", "sh", **kwargs)
    child.expect_exact(PROMPT)
    return child


def run_remote(child: pexpect.spawn, line: str) -> str:
    """Types LINE at the remote prompt; returns what it printed before the next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before.decode(errors="replace").split("\r\n", 1)[-1]


class LocalShell:
    """A local sh in its own PTY: runs the CLI like a user would and inspects the terminal."""

    def __init__(self, rune: Rune, rows: int = 30, cols: int = 100) -> None:
        self.rune = rune
        self.child = pexpect.spawn("sh", cwd=str(ROOT), dimensions=(rows, cols), timeout=30,
                                   env={**rune.env, "PS1": LOCAL_PROMPT})
        self.child.expect_exact(LOCAL_PROMPT)

    def run(self, line: str) -> str:
        self.child.sendline(line)
        self.child.expect_exact(LOCAL_PROMPT)
        return self.child.before.decode(errors="replace").split("\r\n", 1)[-1].strip()

    def stty(self) -> str:
        return self.run("stty -g")

    def start_rune(self, *args: str) -> None:
        line = shlex.join(self.rune.argv("exec", *args))
        self.child.sendline(line)
        self.child.expect_exact(line + "\r\n")  # the echo: later matches are the CLI's own

    def rune_pid(self, timeout: float = 10.0) -> int:
        """The CLI's pid: the local shell's child running cli.main."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in _children(self.child.pid):
                if b"rune.cli.main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            time.sleep(0.05)
        raise AssertionError("the rune CLI did not start")

    def finish(self) -> int:
        """Waits for the local prompt after the CLI ended; returns the CLI's exit status."""
        self.child.expect_exact(LOCAL_PROMPT, timeout=30)
        return int(self.run("echo $?"))

    def close(self) -> None:
        self.child.close(force=True)


def _need(program: str) -> None:
    """Full-screen programs come from the OS (.ci/run installs them): required in CI."""
    if shutil.which(program) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{program} is not installed (apt-get install less vim-tiny)")
        pytest.skip(f"{program} is not installed")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _wait_exit(pid: int, timeout: float = 20.0) -> int:
    """The wait status of our child PID, polled until TIMEOUT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"process {pid} did not exit within {timeout}s")


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


# --- when a TTY is allocated -------------------------------------------------------------

@pytest.mark.parametrize(("command", "expected"), [
    (["sh"], True), (["/bin/bash"], True), (["bash", "-l"], True), (["zsh"], True),
    (["python"], True), (["python3"], True), (["python3.11", "-q"], True),
    (["python", "script.py"], False), (["python", "-c", "print(1)"], False),
    (["python", "-m", "http.server"], False), (["python", "-i", "script.py"], True),
    (["sh", "-c", "[ -t 1 ]"], False), (["bash", "deploy.sh"], False),
    (["vim", "/etc/hosts"], True), (["vi"], True), (["less", "f"], True), (["top"], True),
    (["nano"], True), (["htop"], True), (["more", "x"], True), (["fish"], True),
    (["psql", "-h", "db", "-U", "app"], True), (["psql", "-c", "select 1"], False),
    (["ls", "/"], False), (["cat"], False), (["echo", "sh"], False),
])
def test_interactive_commands_are_recognised(command, expected):
    """Shells, editors, pagers and bare interpreters want a TTY; scripts and one-offs do not."""
    assert wants_tty(command)[0] is expected


def test_flags_win_over_the_rule():
    """--tty forces a TTY even for a one-off, --no-tty refuses it even for a shell."""
    assert decide_tty(["ls"], True) == (True, "--tty given")
    assert decide_tty(["sh"], False) == (False, "--no-tty given")


def test_shell_gets_a_tty_without_flags(trune):
    """`rune exec api sh` in a terminal: `tty` prints a /dev/pts path."""
    child = remote_shell(trune)
    assert re.search(r"/dev/pts/\d+", run_remote(child, "tty"))
    child.sendline("exit")
    child.expect(pexpect.EOF)


def test_one_off_commands_get_no_tty(trune):
    """`ls /` and `sh -c '[ -t 1 ]…'` run with pipes even from a terminal; -v says why."""
    child = spawn(trune, "-v", "api", "ls", "/")
    child.expect(pexpect.EOF)
    out = child.before.decode()
    assert "tty off: ls is not an interactive program" in out
    assert "etc" in out and "usr" in out
    child = spawn(trune, "api", "sh", "-c", "[ -t 0 ] || [ -t 1 ] && echo TTY || echo NOTTY")
    child.expect(pexpect.EOF)
    assert "NOTTY" in child.before.decode()


def test_bulk_tty_output_arrives_whole(trune):
    """A terminal streaming far more than it buffers (and than one frame) loses nothing:
    every byte, in order, and the exit code."""
    size = 24 * 1024 * 1024 + 4321
    script = f"head -c {size} /dev/zero | tr '\\0' 'x'; printf END; exit 3"
    done = trune("exec", "--tty", "api", "sh", "-c", script, timeout=120)
    assert done.returncode == 3, done.stderr
    assert len(done.stdout) == size + 3 and done.stdout.endswith(b"END")
    assert done.stdout.count(b"x") == size


def test_tty_flags(trune):
    """-t gives a one-off a TTY; --no-tty gives a shell none; -v names the deciding rule."""
    child = spawn(trune, "-t", "api", "sh", "-c", "[ -t 1 ] && echo IS-TTY")
    child.expect(pexpect.EOF)
    assert "IS-TTY" in child.before.decode()
    child = spawn(trune, "--no-tty", "-v", "api", "sh")
    child.expect_exact("tty off: --no-tty given")
    child.sendline("tty; exit")
    child.expect(pexpect.EOF)
    assert "not a tty" in child.before.decode()


def test_verbose_names_the_rule(trune):
    """--verbose says that the shell and the local terminals chose the TTY, and the exit."""
    child = spawn(trune, "-v", "--env", f"PS1={PROMPT}", "api", "sh")
    child.expect_exact("tty on: sh is an interactive shell (no script given) and stdin and "
                       "stdout are terminals")
    child.expect_exact(PROMPT)
    child.sendline("exit 4")
    # Written once the terminal is cooked again: the newline comes out as CR LF.
    child.expect(r"rune: remote exit code 4, signal 0, after [0-9.]+ ms\r\n")
    child.expect(pexpect.EOF)


def test_tty_with_piped_stdin_says_so_once(trune):
    """--tty with stdin not a terminal: the remote gets a PTY, one notice on stderr."""
    result = trune("exec", "-t", "api", "sh", "-c", "tty", input=b"")
    assert result.returncode == 0, result.stderr
    assert re.search(rb"/dev/pts/\d+", result.stdout)
    assert result.stderr.count(b"Unable to use a TTY") == 1


def test_piped_script_into_a_tty_ends_at_eof(trune):
    """Stdin EOF under a remote TTY ends the shell like Ctrl+D at an empty line."""
    result = trune("exec", "-t", "api", "sh", input=b"echo from-pipe\n", timeout=30)
    assert result.returncode == 0, result.stderr
    assert b"from-pipe" in result.stdout


def test_piped_partial_line_into_a_tty_ends_at_eof(trune):
    """Stdin that ends mid-line still reaches EOF under a remote TTY (`printf abc | cat`)."""
    result = trune("exec", "-t", "api", "cat", input=b"abc", timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"abc")


# --- size --------------------------------------------------------------------------------

def test_stty_size_follows_the_local_window(trune):
    """The initial size travels in init; a local resize reaches the remote PTY."""
    child = remote_shell(trune, rows=30, cols=100)
    assert run_remote(child, "stty size").strip() == "30 100"
    child.setwinsize(41, 132)
    deadline = time.monotonic() + 10
    while (size := run_remote(child, "stty size").strip()) != "41 132":
        assert time.monotonic() < deadline, size
    child.sendline("exit")
    child.expect(pexpect.EOF)


def test_a_burst_of_resizes_ends_at_the_last_size(trune):
    """Many quick resizes: the remote ends at the last one."""
    child = remote_shell(trune)
    for i in range(30):
        child.setwinsize(20 + i, 60 + i)
    child.setwinsize(33, 111)
    deadline = time.monotonic() + 10
    while (size := run_remote(child, "stty size").strip()) != "33 111":
        assert time.monotonic() < deadline, size
    child.sendline("exit")
    child.expect(pexpect.EOF)


def test_remote_program_gets_sigwinch(trune):
    """A resize signals SIGWINCH to the remote foreground process group."""
    child = remote_shell(trune)
    # A child shell is the foreground job (the interactive one is not, while it waits).
    child.sendline("sh -c 'trap \"echo GOT-WINCH\" WINCH; echo armed; "
                   "while :; do sleep 0.1; done'")
    child.expect_exact("armed\r\n")
    child.setwinsize(25, 90)
    child.expect_exact("GOT-WINCH")
    child.sendcontrol("c")
    child.expect_exact(PROMPT)
    child.sendline("exit")
    child.expect(pexpect.EOF)


# --- keys, signals, environment ----------------------------------------------------------

def test_ctrl_c_interrupts_the_remote_program_not_the_session(trune):
    """`sleep 100` then Ctrl+C: back at the remote prompt, the shell still alive."""
    child = remote_shell(trune)
    child.sendline(FOREGROUND_SLEEP)
    child.expect_exact("started\r\n")
    began = time.monotonic()
    child.sendcontrol("c")
    child.expect_exact(PROMPT, timeout=10)
    assert time.monotonic() - began < 10
    assert "still-alive" in run_remote(child, "echo still-alive")
    child.sendline("exit 5")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 5


def test_ctrl_z_and_ctrl_backslash_are_remote_keys(trune):
    """Ctrl+Z stops the remote foreground job, Ctrl+\\ quits one; the session lives on."""
    child = remote_shell(trune)
    child.sendline(FOREGROUND_SLEEP)
    child.expect_exact("started\r\n")
    child.sendcontrol("z")
    child.expect_exact(PROMPT, timeout=10)
    assert "Stopped" in run_remote(child, "jobs")
    run_remote(child, "kill -9 %1")
    child.sendline(FOREGROUND_SLEEP)
    child.expect_exact("started\r\n")
    child.sendcontrol("\\")
    child.expect_exact(PROMPT, timeout=10)
    assert run_remote(child, "echo $?").strip() == str(128 + signal.SIGQUIT)
    child.sendline("exit")
    child.expect(pexpect.EOF)


def test_term_is_set_and_locale_is_not_forwarded(trune):
    """TERM comes from the local terminal; LANG only with --env."""
    child = remote_shell(trune, env={"TERM": "vt100", "LANG": "fr_FR.UTF-8"})
    assert run_remote(child, "echo term=$TERM").strip() == "term=vt100"
    assert "fr_FR" not in run_remote(child, "echo lang=$LANG")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child = spawn(trune, "--env", "LANG=fr_FR.UTF-8", "-t", "api", "sh", "-c", "echo lang=$LANG")
    child.expect_exact("lang=fr_FR.UTF-8")


# --- the terminal is given back ----------------------------------------------------------

def test_exit_code_and_terminal_restored(trune):
    """`exit 3` → the CLI exits 3, and `stty -g` is the same before and after."""
    shell = LocalShell(trune)
    try:
        before = shell.stty()
        shell.start_rune("--env", f"PS1={PROMPT}", "api", "sh")
        shell.child.expect_exact(PROMPT)
        shell.child.sendline("stty -g")
        shell.child.expect_exact(PROMPT)
        shell.child.sendline("exit 3")
        assert shell.finish() == 3
        assert shell.stty() == before
    finally:
        shell.close()


def test_terminal_restored_on_timeout(trune):
    """A session that hits --timeout exits 124 with the terminal intact."""
    shell = LocalShell(trune)
    try:
        before = shell.stty()
        shell.start_rune("--timeout", "2s", "--env", f"PS1={PROMPT}", "api", "sh")
        shell.child.expect_exact(PROMPT)
        shell.child.expect_exact("Error: command timed out after 2s", timeout=20)
        assert shell.finish() == 124
        assert shell.stty() == before
    finally:
        shell.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_terminal_restored_on_sigterm_and_sighup(trune, signum):
    """SIGTERM/SIGHUP to the CLI end the session, kill the remote shell, restore the terminal."""
    shell = LocalShell(trune)
    try:
        before = shell.stty()
        shell.start_rune("--env", f"PS1={PROMPT}", "api", "sh")
        shell.child.expect_exact(PROMPT)
        shell.child.sendline("echo $$")
        shell.child.expect(r"(\d+)\r\n")
        remote_pid = int(shell.child.match.group(1))
        shell.child.expect_exact(PROMPT)
        os.kill(shell.rune_pid(), signum)
        assert shell.finish() == 128 + signum
        assert shell.stty() == before
        assert _wait_gone(remote_pid), "the remote shell outlived the session"
    finally:
        shell.close()


def test_terminal_hangup_ends_the_session(trune):
    """Closing the local terminal (SIGHUP, terminal gone) ends the CLI and the remote shell."""
    child = remote_shell(trune)
    remote_pid = int(run_remote(child, "echo $$").strip())
    child.ptyproc.fileobj.close()  # the terminal window goes away: the kernel hangs up
    status = _wait_exit(child.pid)
    child.ptyproc.terminated = True
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + signal.SIGHUP
    assert _wait_gone(remote_pid), "the remote shell outlived the session"


def test_terminal_restored_when_the_agent_is_killed(tmp_path):
    """kill -9 of the agent: the session ends on its own (agent lost), terminal intact."""
    stack = start_stack(tmp_path, api_extra=SHORT_HEARTBEAT)
    shell = None
    orphans: list[int] = []
    try:
        shell = LocalShell(Rune(stack, env={"TERM": "xterm-256color"}))
        before = shell.stty()
        shell.start_rune("--env", f"PS1={PROMPT}", "api", "sh")
        shell.child.expect_exact(PROMPT)
        agent = stack.procs["agent-a1"]
        orphans = _children(agent.pid)  # its instances and our shell: reaped below
        agent.kill()
        agent.wait()
        shell.child.expect_exact("Error: ", timeout=20)
        shell.child.expect_exact("lost")
        assert shell.finish() == 255
        assert shell.stty() == before
    finally:
        if shell:
            shell.close()
        stack.stop()
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def test_raw_mode_restores_on_exception():
    """RawMode gives back the exact settings even when the body raises."""
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        with pytest.raises(RuntimeError), RawMode(slave):
            assert termios.tcgetattr(slave) != before
            raise RuntimeError("boom")
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


# --- full-screen programs ----------------------------------------------------------------

def test_less_pages_and_quits(trune):
    """`less` on a 500-line file shows a screenful, pages on space, quits on q."""
    _need("less")
    child = remote_shell(trune, rows=24, cols=80)
    run_remote(child, "seq -f 'line-%g' 500 > /tmp/rune-less-$$.txt; "
                      "echo /tmp/rune-less-$$.txt > /tmp/rune-less-name-$$")
    child.sendline("less /tmp/rune-less-$$.txt")
    child.expect_exact("line-23")
    child.send(" ")
    child.expect_exact("line-46")
    child.send("q")
    child.expect_exact(PROMPT)
    assert "ok" in run_remote(child, "rm /tmp/rune-less-$$.txt && echo ok")
    child.sendline("exit")
    child.expect(pexpect.EOF)


def test_vi_opens_and_quits(trune):
    """`vi` opens full screen, takes an edit, writes it and quits."""
    _need("vi")
    child = remote_shell(trune, rows=24, cols=80)
    child.sendline("vi /tmp/rune-vi-$$.txt")
    child.expect("~")  # empty-buffer filler lines: the editor drew its screen
    child.send("ihello-from-vi")
    child.sendcontrol("[")
    child.send(":wq\r")
    child.expect_exact(PROMPT)
    assert "hello-from-vi" in run_remote(child, "cat /tmp/rune-vi-$$.txt; rm /tmp/rune-vi-$$.txt")
    child.sendline("exit")
    child.expect(pexpect.EOF)


# --- without a TTY -----------------------------------------------------------------------

@pytest.mark.parametrize("flags,signum,name,code,eol", [
    ((), signal.SIGINT, "INT", 7, b"\n"),  # non-TTY: forwarded to the remote process group
    (("-t",), signal.SIGINT, "INT", 7, b"\r\n"),  # --tty, piped stdin: the foreground job
    ((), signal.SIGTERM, "TERM", 9, b"\n"),  # non-TTY SIGTERM is forwarded too
])
def test_signal_to_the_cli_reaches_a_remote_trap(trune, flags, signum, name, code, eol):
    """A signal to the CLI reaches the remote trap, and the remote status comes back."""
    proc = trune.popen("exec", *flags, "api", "sh", "-c",
                       f'trap "echo got-{name}; exit {code}" {name}; echo ready; '
                       "while :; do sleep 0.1; done",
                       stdin=subprocess.PIPE if flags else subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready" + eol
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert (proc.returncode, out) == (code, f"got-{name}".encode() + eol), err


def test_third_ctrl_c_ends_the_session(trune):
    """A remote that shrugs off SIGINT: the third Ctrl+C within 2 s ends it and says so."""
    proc = trune.popen("exec", "api", "sh", "-c",
                       'trap "echo ignored" INT; echo $$; while :; do sleep 0.1; done',
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        remote_pid = int(proc.stdout.readline())
        for _ in range(2):
            proc.send_signal(signal.SIGINT)
            assert proc.stdout.readline() == b"ignored\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.decode().strip() == ("Error: interrupted 3 times: session ended, "
                                    "remote command killed")
    assert _wait_gone(remote_pid), "the remote command outlived the session"


# --- the request writer ------------------------------------------------------------------

class _SlowStream:
    """Records what the outbox writes; each write takes a little while."""

    def __init__(self) -> None:
        self.sent: list[tuple] = []

    async def _record(self, *item: object) -> None:
        self.sent.append(item)
        await asyncio.sleep(0.01)

    async def send_stdin(self, data: bytes) -> None:
        await self._record("stdin", data)

    async def close_stdin(self) -> None:
        await self._record("eof")

    async def resize(self, width: int, height: int) -> None:
        await self._record("resize", width, height)

    async def signal(self, number: int) -> None:
        await self._record("signal", number)


async def test_outbox_coalesces_resizes_and_keeps_stdin_order():
    """A burst of resizes while a write is in flight is sent once, with the last size."""
    stream = _SlowStream()
    outbox = Outbox(stream)
    writer = asyncio.create_task(outbox.run())
    await outbox.stdin(b"a")
    await asyncio.sleep(0)
    for i in range(50):
        outbox.resize(80 + i, 24 + i)
    await outbox.stdin(b"b")
    outbox.signal(2)
    await outbox.stdin_close()
    deadline = time.monotonic() + 5
    while len(stream.sent) < 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    writer.cancel()
    assert [s for s in stream.sent if s[0] == "resize"] == [("resize", 129, 73)]
    assert [s for s in stream.sent if s[0] in ("stdin", "eof")] == [
        ("stdin", b"a"), ("stdin", b"b"), ("eof",)]
    assert ("signal", 2) in stream.sent


def test_no_batching_delay_on_keystrokes(trune):
    """Each keystroke is echoed before the next one is typed (no waiting for more input)."""
    child = spawn(trune, "-t", "api", "sh", "-c", "printf ready; exec cat")
    child.expect_exact("ready")
    for key in "interactive":
        child.send(key)
        child.expect_exact(key, timeout=5)
    child.send("\r")
    child.expect_exact("\r\ninteractive\r\n")  # Enter echoed, then the line from cat
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
