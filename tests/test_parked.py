"""rune-parked (agent/runners/parked.c) run on the host as runc would leave it: the program
on fd 3, the agent's socket on 4. Its requests, hostile ones included, and its answers;
the agent's encoding of requests and its reading of failures."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
import struct
import time
import warnings

import pytest
from rune.agent.runners import parked
from rune.agent.runners.base import CommandUnavailable

from rune.errors import Internal
from rune.models import ExecOpen

if not os.path.exists(parked.PROGRAM):
    if os.environ.get("CI"):
        raise RuntimeError(f"{parked.PROGRAM} was not built by the install")
    pytest.skip("rune-parked not built (no C compiler at install)", allow_module_level=True)

HEAD = struct.Struct("=6I")
IDS = {"session_id": "s1", "namespace": "default", "instance_id": "i1"}
MAGIC = 0x31504E52


class Started:
    """One rune-parked process and the agent's end of its socket."""

    def __init__(self) -> None:
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        program = os.open(parked.PROGRAM, os.O_RDONLY | os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.pid = parked.spawn_runc([parked.PROGRAM, "rune-parked"], (null, null, null),
                                         (program, theirs.fileno()))
        finally:
            for fd in (program, null):
                os.close(fd)
            theirs.close()
        self.control.settimeout(10)

    def send(self, payload: bytes, fds: list[int] = ()) -> None:
        socket.send_fds(self.control, [payload], list(fds))

    def answers(self) -> list[tuple[bytes, list[int]]]:
        """Every message up to EOF (the exec, or the program's exit)."""
        got = []
        while True:
            data, fds, _, _ = socket.recv_fds(self.control, 8192, 4)
            if not data:
                return got
            got.append((data, fds))

    def exit_code(self) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.005)
        os.kill(self.pid, 9)
        raise AssertionError("rune-parked did not leave")


def request(argv: list[str], env: dict[str, str] | None = None, workdir: str = "",
            tty: bool = False, width: int = 80, height: int = 24) -> bytes:
    payload = parked.encode_request(ExecOpen(argv=argv, env=env or {}, workdir=workdir,
                                             tty=tty, width=width, height=height, **IDS))
    assert payload is not None
    return payload


def run_piped(started: Started, payload: bytes) -> tuple[list, bytes, bytes, int]:
    """Sends payload with three pipes as stdio: (answers, stdout, stderr, exit code)."""
    ends = [os.pipe() for _ in range(3)]
    started.send(payload, [ends[0][0], ends[1][1], ends[2][1]])
    for fd in (ends[0][0], ends[1][1], ends[2][1]):
        os.close(fd)
    os.close(ends[0][1])
    answers = started.answers()
    code = started.exit_code()
    out = [b"", b""]
    for i, (read_end, _) in enumerate(ends[1:]):
        while chunk := os.read(read_end, 65536):
            out[i] += chunk
        os.close(read_end)
    return answers, out[0], out[1], code


def test_runs_the_command_with_overrides_and_directory(tmp_path):
    """The command runs in the directory asked, with the overrides over the environment
    it was started with (PATH here)."""
    started = Started()
    payload = request(["sh", "-c", 'echo "$A|$PATH"; pwd; echo err >&2'],
                      env={"A": "1", "PATH": "/usr/bin:/bin"}, workdir=str(tmp_path))
    answers, out, err, code = run_piped(started, payload)
    assert answers == [] and code == 0
    assert out.decode().splitlines() == ["1|/usr/bin:/bin", str(tmp_path)]
    assert err == b"err\n"


def test_command_holds_no_descriptor_but_its_stdio():
    """Neither the program's descriptor nor the agent's socket reaches the command."""
    started = Started()
    answers, out, _, code = run_piped(started, request(["ls", "-l", "/proc/self/fd"]))
    assert code == 0 and answers == []
    links = [line.split(" -> ")[1] for line in out.decode().splitlines() if " -> " in line]
    assert len(links) == 4 and all(link.startswith("pipe:") for link in links[:3])
    assert links[3].startswith("/proc/") and links[3].endswith("/fd")  # ls's own
    assert not any("socket:" in link or "rune-parked" in link for link in links)


def test_command_is_its_session_leader():
    """Its own session and process group, so that a signal to the group reaches it all."""
    started = Started()
    answers, out, _, code = run_piped(started, request(
        ["sh", "-c", "cut -d' ' -f6 /proc/$$/stat; echo $$"]))
    session, pid = out.decode().split()
    assert code == 0 and session == pid == str(started.pid)


@pytest.mark.parametrize("argv,stage,error,code", [
    (["no-such-command-xyz"], 4, errno.ENOENT, 127),
    (["/no/such/file"], 4, errno.ENOENT, 127),
    (["/etc/passwd"], 4, errno.EACCES, 126),
    (["/tmp"], 4, errno.EISDIR, 126),
])
def test_a_command_that_cannot_start_is_said_and_not_run(argv, stage, error, code):
    started = Started()
    answers, out, _, exit_code = run_piped(started, request(argv))
    assert len(answers) == 1 and exit_code == code and out == b""
    assert struct.unpack_from("=Ii", answers[0][0]) == (stage, error)


def test_a_missing_directory_is_said(tmp_path):
    started = Started()
    answers, _, _, code = run_piped(started, request(["true"], workdir=str(tmp_path / "no")))
    assert code == 126 and struct.unpack_from("=Ii", answers[0][0]) == (2, errno.ENOENT)
    assert answers[0][0][8:] == str(tmp_path / "no").encode()


def _hostile_requests(marker: str) -> dict[str, tuple[bytes, int]]:
    words = b"\0touch\0" + marker.encode() + b"\0"
    return {
        "wrong magic": (HEAD.pack(0xDEADBEEF, 0, 80, 24, 2, 0) + words, 3),
        "more words than sent": (HEAD.pack(MAGIC, 0, 80, 24, 9, 0) + words, 3),
        "huge counts": (HEAD.pack(MAGIC, 0, 80, 24, 0xFFFFFFFF, 0xFFFFFFFF) + words, 3),
        "no argv": (HEAD.pack(MAGIC, 0, 80, 24, 0, 0) + b"\0", 3),
        "unterminated word": (HEAD.pack(MAGIC, 0, 80, 24, 2, 0) + words[:-1], 3),
        "override without =": (HEAD.pack(MAGIC, 0, 80, 24, 2, 1) + words + b"PATH\0", 3),
        "short header": (b"RNP1", 3),
        "stdio with a terminal": (HEAD.pack(MAGIC, 1, 80, 24, 2, 0) + words, 3),
        "no stdio without one": (HEAD.pack(MAGIC, 0, 80, 24, 2, 0) + words, 0),
        "two stdio": (HEAD.pack(MAGIC, 0, 80, 24, 2, 0) + words, 2),
    }


@pytest.mark.parametrize("name", list(_hostile_requests("x")))
def test_malformed_requests_run_nothing(name, tmp_path):
    """Each malformed request is refused (stage 1, exit 126) and nothing runs."""
    marker = tmp_path / "ran"
    payload, fd_count = _hostile_requests(str(marker))[name]
    started = Started()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        started.send(payload, [null] * fd_count)
    finally:
        os.close(null)
    answers = started.answers()
    assert started.exit_code() == 126
    assert len(answers) == 1 and struct.unpack_from("=I", answers[0][0])[0] == 1
    assert not marker.exists()


def test_closed_socket_lets_it_go():
    """The agent letting a parked start go (closing its end) ends it quietly."""
    started = Started()
    started.control.close()
    assert started.exit_code() == 0


def test_terminal_is_sized_before_the_command_and_master_sent():
    """With a TTY it sends back one terminal master, sized before the command looks."""
    started = Started()
    started.send(request(["sh", "-c", "stty size; tty"], tty=True, width=101, height=33))
    answers = started.answers()
    assert len(answers) == 1 and answers[0][0] == b"T" and len(answers[0][1]) == 1
    master = answers[0][1][0]
    assert parked_master(master)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert started.exit_code() == 0
    lines = output.decode().split()
    assert lines[:2] == ["33", "101"] and lines[2].startswith("/dev/pts/")


def parked_master(fd: int) -> bool:
    from rune.agent.runners.runc_detached import is_terminal_master

    return is_terminal_master(fd)


# --- the agent's side -------------------------------------------------------------------

def test_requests_it_cannot_carry_go_to_runc():
    """A NUL inside a word, a relative directory or a request past the limit: None, so
    runc's own route starts it (and says what is wrong)."""
    # ExecOpen refuses NULs itself; the encoding does not rely on it.
    unchecked = ExecOpen.model_construct
    assert parked.encode_request(unchecked(argv=["a\0b"], env={}, tty=False)) is None
    assert parked.encode_request(unchecked(argv=["true"], env={"X": "a\0"}, tty=False)) is None
    assert parked.encode_request(unchecked(argv=["true"], env={}, workdir="rel",
                                           tty=False)) is None
    assert parked.encode_request(ExecOpen(argv=["x" * 70_000, "y" * 70_000], **IDS)) is None
    tty = parked.encode_request(ExecOpen(argv=["sh"], tty=True, **IDS))
    assert b"TERM=xterm-256color\0" in tty


def test_failures_read_as_runc_words_them():
    def said(stage: int, error: int, path: bytes = b"", argv0: str = "cmd") -> Exception:
        return parked.failure(struct.pack("=Ii", stage, error) + path, argv0, "/no")

    missing = said(4, errno.ENOENT)
    assert isinstance(missing, CommandUnavailable) and missing.exit_code == 127
    assert str(missing) == 'exec: "cmd": executable file not found in $PATH'
    assert said(4, errno.ENOENT, b"/x", "/x").exit_code == 127
    assert str(said(4, errno.EACCES, b"/etc/passwd", "/etc/passwd")) == \
        'exec: "/etc/passwd": permission denied'
    workdir = said(2, errno.ENOENT, b"/no")
    assert workdir.exit_code == 126 and "/no" in str(workdir)
    assert isinstance(said(1, errno.EINVAL), parked.NotStarted)  # runc may start it
    assert isinstance(said(3, errno.EPERM), parked.NotStarted)
    assert isinstance(parked.failure(b"xy", "cmd", ""), Internal)  # too short to be one


def test_a_tampered_report_cannot_put_its_bytes_in_the_message():
    """The names in a failure are the ones the agent sent, never the report's: a start
    tampered with inside the container cannot write escapes to the user's terminal."""
    hostile = b"\x1b]0;owned\x07\x1b[2J"
    for stage in (2, 4, 5):
        text = str(parked.failure(struct.pack("=Ii", stage, errno.ENOENT) + hostile,
                                  "/bin/x", "/srv"))
        assert "\x1b" not in text and "owned" not in text
    assert "error 99999" in str(parked.failure(struct.pack("=Ii", 5, 99999), "x", ""))


def _open_files() -> set[tuple[str, str]]:
    """This process's descriptors and what each is open on."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:  # the listing's own, closed by now
            pass
    return found


async def test_a_start_runc_refuses_leaves_nothing_open():
    """Parking where runc fails (the container gone, say) leaves no descriptor behind,
    however often it is tried, and parks nothing."""
    from rune.agent.runners.runc_exec import PidFiles

    pids = PidFiles()
    starts = parked.ParkedStarts(lambda cid, pid_file: ["/bin/false"], pids)
    try:
        starts.park("c0")  # the first one opens what the loop keeps for good
        while starts._parking:
            await asyncio.sleep(0.01)
        before = _open_files()
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always", ResourceWarning)  # one left for the collector
            for _ in range(5):
                starts.park("c1")
                while starts._parking:
                    await asyncio.sleep(0.01)
            gc.collect()
        assert _open_files() - before == set()  # (others may have closed meanwhile)
        assert not [w for w in warned if issubclass(w.category, ResourceWarning)]
        assert starts._parked == {}
    finally:
        starts.close()
        pids.close()
