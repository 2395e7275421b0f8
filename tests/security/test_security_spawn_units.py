"""The agent's child start and state directory, against hostile inputs (real forks, real
files): every failure reported from the child, nothing followed through a link."""

from __future__ import annotations

import os
import shutil

import pytest
from rune.agent.account import Account
from rune.agent.runners.base import CommandUnavailable
from rune.agent.runners.process import PipeExecution, ProcessRunner, start_child
from rune.agent.runners.spawn import ChildPlan, SpawnFailed
from rune.agent.statedir import StateDir, StateDirRefused


async def _start(plan: ChildPlan):
    null = os.open(os.devnull, os.O_RDWR)
    try:
        return await start_child(plan, (null, null, null))
    finally:
        os.close(null)


async def test_missing_command_and_workdir_come_back_from_the_child(tmp_path):
    """127 for a missing command, 126 for a missing workdir or a file that is not
    executable; the child reports them and exits."""
    env = {"PATH": "/usr/bin:/bin"}
    with pytest.raises(CommandUnavailable) as missing:
        await _start(ChildPlan(["no-such-command-x"], env, "/"))
    assert missing.value.exit_code == 127
    with pytest.raises(CommandUnavailable, match="no such directory") as nodir:
        await _start(ChildPlan(["true"], env, str(tmp_path / "gone")))
    assert nodir.value.exit_code == 126
    plain = tmp_path / "plain"
    plain.write_text("echo hi\n")
    with pytest.raises(CommandUnavailable) as noexec:
        await _start(ChildPlan([str(plain)], env, "/"))
    assert noexec.value.exit_code == 126
    script = tmp_path / "script"
    script.write_text("#!/no/such/interpreter\n")
    os.chmod(script, 0o755)
    with pytest.raises(CommandUnavailable) as badinterp:
        await _start(ChildPlan([str(script)], env, "/"))
    assert badinterp.value.exit_code == 127


async def test_a_child_failure_of_any_kind_ends_in_a_report():
    """Even a failure that is no OSError (a bad env value) is reported; the child exits."""
    with pytest.raises(SpawnFailed, match="cannot start the command"):
        await _start(ChildPlan(["true"], {"A": 1}, "/"))  # type: ignore[dict-item]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_child_is_the_instance_user_before_it_looks(tmp_path):
    """The child drops to the user first: a root-only workdir is refused as that user."""
    nobody = Account.of("nobody")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(CommandUnavailable, match="permission denied") as denied:
        await _start(ChildPlan(["true"], {"PATH": "/bin"}, str(private), nobody))
    assert denied.value.exit_code == 126
    child = await _start(ChildPlan(["true"], {"PATH": "/usr/bin:/bin"}, "/", nobody))
    assert await child.wait() == (0, 0)


async def test_pipe_exec_runs_with_the_given_environment_only(tmp_path):
    """A pipe exec gets the instance's environment and --env, nothing of the agent's."""
    from rune.agent.runners.process import InstanceContext

    from rune.models import ExecOpen, InstanceInfo

    os.environ["RUNE_TEST_AGENT_SECRET"] = "leak"
    try:
        context = InstanceContext({"PATH": "/usr/bin:/bin", "MODE": "x"}, str(tmp_path),
                                  Account.of(None))
        runner = ProcessRunner(lambda _: context)
        info = InstanceInfo(namespace="default", service="api", instance_id="api-instance-t-0",
                            state="running", agent="t", host="h", runner="process")
        execution = await runner.exec(info, ExecOpen(
            session_id="s1", namespace="default", instance_id="api-instance-t-0",
            argv=["env"], env={"EXTRA": "1"}))
        assert isinstance(execution, PipeExecution)
        await execution.close_stdin()
        out = b""
        while chunk := await execution.read_stdout(65536):
            out += chunk
        assert await execution.wait() == (0, 0)
        execution.close()
    finally:
        del os.environ["RUNE_TEST_AGENT_SECRET"]
    assert sorted(out.decode().split()) == ["EXTRA=1", "MODE=x", "PATH=/usr/bin:/bin"]


def test_state_dir_is_private_and_refuses_planted_links(tmp_path):
    """0700 and ours; an instance directory planted as a link is refused, not followed."""
    state = StateDir(str(tmp_path / "state"), shared=False)
    try:
        assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
        path = state.instance_dir("api-instance-a-0", None, None)
        assert os.path.isdir(path) and not os.path.islink(path)
        target = tmp_path / "etc"
        target.mkdir()
        (tmp_path / "state" / "instances" / "api-instance-a-1").symlink_to(target)
        with pytest.raises(StateDirRefused, match="symbolic link"):
            state.instance_dir("api-instance-a-1", 65534, 65534)
        assert target.stat().st_uid == os.geteuid()
    finally:
        state.close()


def test_planted_instances_link_is_refused(tmp_path):
    """`instances` itself planted as a link (in a state dir of ours) is refused too."""
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "instances").symlink_to(tmp_path)
    with pytest.raises(StateDirRefused, match="symbolic link"):
        StateDir(str(tmp_path / "state"), shared=False)
    shutil.rmtree(tmp_path / "state")
