"""hide_paths on a root agent: the instance user sees empty read-only covers where the
listed paths are, keeps its own directory, and cannot lift a cover; the host's own view is
untouched (real forks, real mounts)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from pydantic import ValidationError
from rune.agent.account import Account
from rune.agent.config import AgentConfig
from rune.agent.isolation import Isolation
from rune.agent.runners.process import start_child
from rune.agent.runners.spawn import ChildPlan

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a root agent switching to nobody")


@pytest.fixture
def host():
    """A stack-like tree everyone may read: secrets, and an instance directory inside."""
    top = Path(tempfile.mkdtemp(prefix="rune-iso-", dir="/tmp"))
    os.chmod(top, 0o755)
    state = top / "state"
    (state / "tokens").mkdir(parents=True)
    (state / "tokens" / "root.token").write_text("TOKEN-abc\n")
    (state / "seed.nk").write_text("SEED-def\n")
    work = state / "instances" / "api-instance-h-0"
    work.mkdir(parents=True)
    (work / "README").write_text("own files\n")
    (top / "loose.conf").write_text("LOOSE-ghi\n")
    shutil.chown(work, "nobody")
    for path in [top, *top.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    yield top
    shutil.rmtree(top, ignore_errors=True)


async def _run(plan: ChildPlan) -> tuple[int, str]:
    out_r, out_w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        child = await start_child(plan, (null, out_w, out_w))
    finally:
        os.close(out_w)
        os.close(null)
    chunks = []
    while data := os.read(out_r, 65536):  # small output; the child ends on its own
        chunks.append(data)
    os.close(out_r)
    code, _ = await child.wait()
    return code, b"".join(chunks).decode()


@needs_root
async def test_hidden_paths_are_empty_and_the_own_directory_stays(host):
    """Secrets under a hidden directory and a hidden file are gone; README is there."""
    state, work = host / "state", host / "state" / "instances" / "api-instance-h-0"
    isolation = Isolation((str(state), str(host / "loose.conf")), keep=str(work))
    script = (f"cat README; cat {state}/tokens/root.token {state}/seed.nk "
              f"{host}/loose.conf 2>/dev/null; ls -A {state} {state}/instances; id -un")
    code, out = await _run(ChildPlan(["sh", "-c", script], ENV, str(work),
                                     Account.of("nobody"), isolation=isolation))
    assert code == 0
    assert "own files" in out and out.strip().endswith("nobody")
    for secret in ("TOKEN-abc", "SEED-def", "LOOSE-ghi", "tokens", "seed.nk"):
        assert secret not in out, out


@needs_root
async def test_covers_cannot_be_lifted_by_the_instance_user(host):
    """umount, remount rw and a nested user namespace all leave the secret hidden."""
    state = host / "state"
    token = state / "tokens" / "root.token"
    script = (f"umount {state}; mount -o remount,rw {state}; touch {state}/x; "
              f"unshare -Urm sh -c 'umount -l {state}; cat {token}'; cat {token}; true")
    code, out = await _run(ChildPlan(["sh", "-c", script], ENV, "/", Account.of("nobody"),
                                     isolation=Isolation((str(state),))))
    assert code == 0
    assert "TOKEN-abc" not in out
    assert not (state / "x").exists()


@needs_root
async def test_the_hosts_view_is_untouched(host):
    """Covers live in the child's namespace only: nothing shows up in the agent's mounts."""
    state = host / "state"
    code, _ = await _run(ChildPlan(["true"], ENV, "/", Account.of("nobody"),
                                   isolation=Isolation((str(state),))))
    assert code == 0
    assert "rune-hidden" not in Path("/proc/self/mountinfo").read_text()
    assert (state / "tokens" / "root.token").read_text() == "TOKEN-abc\n"


@needs_root
async def test_missing_paths_and_nested_ones_are_fine(host):
    """A hidden path that does not exist is skipped; one inside another is covered once."""
    state = host / "state"
    isolation = Isolation((str(host / "no-such"), str(state / "tokens"), str(state)))
    code, out = await _run(ChildPlan(["sh", "-c", f"ls -A {state}; echo done"], ENV, "/",
                                     Account.of("nobody"), isolation=isolation))
    assert (code, out) == (0, "done\n")


@pytest.mark.parametrize("path", ["relative/dir", "", "x\0y"])
def test_hide_paths_must_be_absolute(path):
    """A hide path that is not absolute is a config error, not a silent no-op."""
    with pytest.raises(ValidationError, match="absolute"):
        AgentConfig.model_validate({"agent_id": "a", "services": [
            {"name": "api", "command": ["true"], "isolation": {"hide_paths": [path]}}]})
