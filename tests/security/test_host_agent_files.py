"""The agent's own directory stays 0700 even when instances run as other users (their
directories live beside it, in a traverse-only directory), and a root agent's
`default_user` runs user-less services unprivileged (real files, a real stack)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import Rune, start_stack
from rune.agent.statedir import StateDir, StateDirRefused

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="instances of another user need "
                                "a root agent")
NOBODY = pwd.getpwnam("nobody")


def _mode(path: Path) -> int:
    return path.lstat().st_mode & 0o777


@pytest.fixture
def open_dir():
    """A directory everyone may traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="rune-state-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}",
                           "--clear-groups", *argv], capture_output=True, text=True, timeout=30)


def test_alone_the_instances_live_inside_the_private_state_dir(open_dir):
    """Every instance runs as the agent: state dir and instances/ are 0700, nothing else."""
    state = StateDir(str(open_dir / "agent"), shared=False)
    try:
        work = Path(state.instance_dir("api-instance-a-0", None, None))
        assert work == open_dir / "agent" / "instances" / "api-instance-a-0"
        assert [_mode(p) for p in (open_dir / "agent", work.parent, work)] == [0o700] * 3
        assert not (open_dir / "agent-instances").exists()
    finally:
        state.close()


@needs_root
def test_shared_state_dir_stays_0700_and_instances_are_beside_it(open_dir):
    """With an instance of another user the state dir is still 0700; that user reaches its
    own 0700 directory through a traverse-only 0711 one and can list neither."""
    state = StateDir(str(open_dir / "agent"), shared=True)
    try:
        work = Path(state.instance_dir("api-instance-a-0", NOBODY.pw_uid, NOBODY.pw_gid))
        state.instance_dir("api-instance-a-1", None, None)
    finally:
        state.close()
    assert work.parent == open_dir / "agent-instances"
    assert _mode(open_dir / "agent") == 0o700
    assert _mode(work.parent) == 0o711 and work.parent.stat().st_uid == 0
    assert _mode(work) == 0o700 and work.stat().st_uid == NOBODY.pw_uid
    assert _as_nobody("sh", "-c", f"cd {work} && touch mine").returncode == 0
    for where in (open_dir / "agent", work.parent):
        assert _as_nobody("ls", str(where)).returncode != 0, where
    assert _as_nobody("ls", str(work.parent / "api-instance-a-1")).returncode != 0
    assert os.listdir(open_dir / "agent") == []  # nothing of the instances is in it


@needs_root
def test_instances_dir_inside_a_shared_state_dir_is_refused(open_dir):
    """instances_dir under the 0700 state dir could not be reached: refused with why."""
    with pytest.raises(StateDirRefused, match="put it outside"):
        StateDir(str(open_dir / "agent"), shared=True,
                 instances_dir=str(open_dir / "agent" / "work"))


@needs_root
def test_planted_link_at_the_instances_dir_is_refused(open_dir):
    """`<state>-instances` planted as a link (or someone else's) is refused, not followed."""
    target = open_dir / "etc-like"
    target.mkdir()
    (open_dir / "agent-instances").symlink_to(target)
    with pytest.raises(StateDirRefused, match="symbolic link"):
        StateDir(str(open_dir / "agent"), shared=True)
    (open_dir / "agent-instances").unlink()
    (open_dir / "agent-instances").mkdir()
    os.chown(open_dir / "agent-instances", NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(StateDirRefused, match="is owned by uid"):
        StateDir(str(open_dir / "agent"), shared=True)
    assert _mode(target) == 0o755


# --- default_user: user-less services on a root agent ------------------------------------

SERVICES = [
    {"name": "plain", "replicas": 1, "command": ["sh", "-c", "exec sleep 2147483647"]},
    {"name": "admin", "replicas": 1, "user": "root",
     "command": ["sh", "-c", "exec sleep 2147483647"]},
]


@pytest.fixture(scope="module")
def default_user_stack(tmp_path_factory):
    # The instances' directories where nobody can traverse (pytest's tmp is root's alone).
    work = Path(tempfile.mkdtemp(prefix="rune-defuser-", dir="/tmp"))
    os.chmod(work, 0o755)
    stack = start_stack(tmp_path_factory.mktemp("defuser"), agents={"du": SERVICES},
                        agent_extra={"default_user": "nobody",
                                     "instances_dir": str(work / "instances")})
    yield stack
    stack.stop()
    shutil.rmtree(work, ignore_errors=True)


@needs_root
def test_default_user_runs_user_less_services_unprivileged(default_user_stack):
    """`default_user: nobody`: a service without user: and every exec into it (pipes and
    TTY) run as nobody; one that says `user: root` still runs as root."""
    rune = Rune(default_user_stack)
    for tty in ([], ["-t"]):
        result = rune("exec", *tty, "plain", "sh", "-c", "id -un; echo $USER $HOME; pwd")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.decode().replace("\r", "").splitlines()
        assert lines[0] == "nobody" and lines[1] == f"nobody {NOBODY.pw_dir}", lines
        assert lines[2].endswith("/instances/plain-instance-du-0"), lines
    assert rune("exec", "admin", "id", "-un").stdout.decode().strip() == "root"
    assert _mode(default_user_stack.state_dir / "agents" / "du") == 0o700


@needs_root
def test_without_default_user_a_root_agent_still_runs_them_as_root(tmp_path):
    """The default stays as docker's: no default_user, no user: -> root, with a warning."""
    stack = start_stack(tmp_path, agents={"dr": SERVICES[:1]})
    try:
        result = Rune(stack)("exec", "plain", "id", "-un")
        assert result.stdout.decode().strip() == "root", result.stderr
        log = (stack.logs / "agent-dr.log").read_text()
        assert "service plain runs as root" in log and "default_user" in log
    finally:
        stack.stop()
