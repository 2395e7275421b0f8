"""The agent as subreaper: adopted orphans are reaped, its own children and adopted
commands are not; runc's console socket hands over a terminal master and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator

import pytest
from rune.agent.runners.process import Child, start_child
from rune.agent.runners.reaper import REAPER
from rune.agent.runners.runc_detached import is_terminal_master, receive_master
from rune.agent.runners.runc_exec import PidFiles
from rune.agent.runners.spawn import ChildPlan

from rune.errors import Internal

_AWAY = "sh -c 'sleep $0; exit $1'"  # sleeps $0 seconds, exits $1


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def _exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


async def _output(plan: ChildPlan) -> tuple[bytes, tuple[int, int]]:
    """Runs plan to its end (and no further: what it leaves running is not killed)."""
    read_end, write_end = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        child = await start_child(plan, (null, write_end, null))
    finally:
        os.close(write_end)
        os.close(null)
    status = await child.wait()
    with os.fdopen(read_end, "rb") as out:
        return out.read(), status


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """This process as the agent is: a subreaper reaping what it adopts (on this loop)."""
    REAPER.enable()
    try:
        yield
    finally:
        REAPER.disable()


async def test_adopted_orphans_are_reaped_and_own_children_keep_their_status():
    """A command's background child, adopted once the command leaves, is reaped when it
    ends; the command's own exit status still reaches its owner, untouched."""
    with subreaper():
        plan = ChildPlan(argv=["sh", "-c", f"{_AWAY} 0.5 0 >/dev/null & echo $!; exit 5"],
                         env={"PATH": os.defpath}, cwd="/")
        out, status = await _output(plan)
        orphan = int(out)
        assert status == (5, 0)
        assert _exists(orphan) and os.waitid(os.P_PID, orphan, os.WEXITED | os.WNOHANG
                                             | os.WNOWAIT) is None  # adopted, still running
        for _ in range(40):
            if not _exists(orphan):
                break
            await asyncio.sleep(0.1)
        assert not _exists(orphan), "the adopted orphan was left a zombie"


async def test_a_command_learnt_from_its_pid_file_is_never_taken_by_the_reaper():
    """As with `runc exec -d`: the starter leaves, the command it wrote into a PID file is
    adopted; however often the reaper looks, the exit status is left to the agent."""
    with subreaper():
        files = PidFiles()
        try:
            pid_file, known = files.new()
            script = (f'{_AWAY} 0.3 7 >/dev/null & echo $! > {pid_file}.tmp; '
                      f'mv {pid_file}.tmp {pid_file}')
            _, status = await _output(ChildPlan(argv=["sh", "-c", script],
                                                env={"PATH": os.defpath}, cwd="/"))
            assert status == (0, 0)
            files.drain()
            pid = await asyncio.wait_for(known, 5)
            assert REAPER.owns(pid)
            for _ in range(100):  # until the command has ended: looking must not take it
                REAPER.reap_orphans()
                if not _alive(pid):
                    break
                await asyncio.sleep(0.05)
            REAPER.reap_orphans()  # once more with the command a zombie: still not taken
            assert _exists(pid) and not _alive(pid)
            assert await asyncio.wait_for(Child(pid).wait(), 5) == (7, 0)
            assert not REAPER.owns(pid)
        finally:
            files.close()


async def test_without_the_reaper_nothing_is_reaped():
    """Off (any process but the agent), reap_orphans takes no child of anyone's."""
    assert not REAPER.enabled
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(3)
    try:
        await asyncio.sleep(0.1)
        assert REAPER.reap_orphans() == 0
        assert os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3


async def _send(path: str, fds: list[int] | None, message: bytes = b"/dev/ptmx") -> None:
    """Connects as runc would and passes fds; None: hangs up without a word."""
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await asyncio.get_running_loop().run_in_executor(None, peer.connect, path)
        if fds is not None:
            socket.send_fds(peer, [message], fds)
    finally:
        peer.close()


async def _receive(fds: list[int] | None) -> int:
    with tempfile.TemporaryDirectory() as where:
        path = os.path.join(where, "console")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.setblocking(False)
        listener.bind(path)
        listener.listen(1)
        try:
            got, _ = await asyncio.gather(receive_master(listener), _send(path, fds))
            return got
        finally:
            listener.close()


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def test_console_socket_takes_a_terminal_master_and_closes_the_rest():
    """A master is kept (one only); a pipe, a file, a terminal's slave, no descriptor or a
    peer that hangs up at once are refused and every descriptor passed is closed, so a
    hostile peer can neither feed the agent a stand-in terminal nor leak descriptors into
    it."""
    master, slave = os.openpty()
    extra_master, extra_slave = os.openpty()
    before = _open_fds()
    got = await _receive([master, extra_master])
    try:
        assert is_terminal_master(got) and os.ttyname(slave)
        assert len(_open_fds() - before) == 1  # only the master kept
    finally:
        os.close(got)
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as plain:
        for hostile in ([read_end], [plain.fileno()], [slave], [], None):
            before = _open_fds()
            with pytest.raises(Internal, match="no terminal"):
                await _receive(hostile)
            assert _open_fds() - before == set()
    for fd in (master, slave, extra_master, extra_slave, read_end, write_end):
        os.close(fd)


async def test_a_pid_file_inotify_missed_is_still_learnt_once_runc_left():
    """Should inotify miss the rename (an overflowed queue), learning the PID once runc
    has left reads the file itself, and the PID is owned as if inotify had told."""
    files = PidFiles()
    try:
        path, known = files.new()
        with open(path, "w") as f:  # in place: no IN_MOVED_TO for inotify to tell
            f.write("424242")
        files.drain()
        assert not known.done()
        files.learn(path)
        assert known.result() == 424242 and REAPER.owns(424242)
        REAPER.release(424242)
        other, unknown = files.new()
        files.learn(other)  # no file at all: nothing learnt, nothing owned
        assert not unknown.done()
    finally:
        files.close()
