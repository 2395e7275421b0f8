"""What makes a big fan-out cheap, each against the real parts: the batch open (one request
per agent, each open answered on its own, hostile batches refused), the LinkHub (one
subscription per agent), and the vfork child (the same steps and reports as the fork)."""

from __future__ import annotations

import asyncio
import os
import uuid

import msgpack
import pytest
import pytest_asyncio
from multi_agent import fleet_configs
from rune.agent.runners import spawn
from rune.agent.runners.base import CommandUnavailable
from rune.agent.runners.process import start_child
from rune.agent.runners.spawn import ChildPlan, SpawnFailed
from rune.agent.server import Agent
from rune.apiserver.open_batch import OpenBatcher
from rune.cli.devstack import Stack, free_port

from rune import frames
from rune.link import LinkHub, LinkSettings, SessionLink
from rune.models import ExecOpen, ExecOpened
from rune.natsconn import connect
from rune.subjects import Subjects

REPLICAS = 6
SUBJECTS = Subjects()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("speed"), nats_port=free_port(), api_port=free_port())
    try:
        stack.start_nats()
        yield stack
    finally:
        stack.stop()


@pytest_asyncio.fixture(loop_scope="function")  # the tests' loop, which runs the agent
async def agent(broker, tmp_path):
    config = fleet_configs(broker.nats_url, 1, REPLICAS, str(tmp_path), id_prefix="s")[0]
    agent = Agent(config)
    await agent.start()
    for _ in range(200):  # the supervised instances come up
        if sum(1 for i in agent.registry.current.values() if i.state == "running") == REPLICAS:
            break
        await asyncio.sleep(0.05)
    nc = await connect(broker.nats_url, "test-apiserver", None, None, "_INBOX_test")
    try:
        yield agent, nc
    finally:
        await nc.close()
        await agent.stop()


def _open(agent: Agent, index: int, **fields: object) -> bytes:
    request = {"session_id": uuid.uuid4().hex, "namespace": "default",
               "instance_id": f"fleet-instance-{agent.config.agent_id}-{index}",
               "argv": ["true"], "heartbeat": 0.2, "lost_after": 2, **fields}
    return frames.pack(request)


async def _ask(nc, agent: Agent, payload: object) -> object:
    reply = await nc.request(SUBJECTS.agent_exec(agent.config.agent_id),
                             msgpack.packb(payload, use_bin_type=True), timeout=10)
    return frames.unpack(reply.data)


async def test_concurrent_opens_for_one_agent_leave_as_one_request(agent):
    """Six opens waiting for one agent are one NATS request; each gets its own reply."""
    agent, nc = agent
    batcher = OpenBatcher(nc, SUBJECTS, timeout=10)
    answers = await asyncio.gather(*(batcher.open(agent.config.agent_id, _open(agent, i))
                                     for i in range(REPLICAS)))
    assert batcher.requests == 1
    assert [ExecOpened.model_validate(a).ok for a in answers] == [True] * REPLICAS


async def test_one_bad_open_in_a_batch_fails_alone(agent):
    """An unknown instance in a batch is refused; the others of the batch start."""
    agent, nc = agent
    batcher = OpenBatcher(nc, SUBJECTS, timeout=10)
    payloads = [_open(agent, 0), _open(agent, 0, instance_id="fleet-instance-s000-99"),
                _open(agent, 1)]
    answers = [ExecOpened.model_validate(a) for a in await asyncio.gather(
        *(batcher.open(agent.config.agent_id, p) for p in payloads))]
    assert batcher.requests == 1
    assert [a.ok for a in answers] == [True, False, True]
    assert answers[1].error["code"] == "not_found"


async def test_hostile_batches_are_refused_entry_by_entry(agent):
    """Garbage entries, a non-bytes entry and a bad id are refused one by one; too many
    entries or no list is one refusal; the agent then opens a plain request as before."""
    agent, nc = agent
    answer = await _ask(nc, agent, {"kind": "exec_batch", "opens": [
        b"\xc1garbage", 7, _open(agent, 2), _open(agent, 3, session_id="a.b\n")]})
    opened = [ExecOpened.model_validate(o) for o in answer["opened"]]
    assert [o.ok for o in opened] == [False, False, True, False]
    assert all(o.error["code"] == "invalid_argument" for o in opened if not o.ok)
    for opens in ([_open(agent, 0)] * 257, [], "x", None):
        answer = await _ask(nc, agent, {"kind": "exec_batch", "opens": opens})
        assert [ExecOpened.model_validate(o).ok for o in answer["opened"]] == [False]
    plain = await nc.request(SUBJECTS.agent_exec(agent.config.agent_id), _open(agent, 4),
                             timeout=10)
    assert ExecOpened.model_validate(frames.unpack(plain.data)).ok


async def test_link_hub_shares_one_subscription_and_routes_by_subject(broker):
    """Three links on one hub are one subscription; each frame reaches only its link; the
    subscription goes with the last link."""
    nc = await connect(broker.nats_url, "test-hub", None, None, "_INBOX_hub")
    sender = await connect(broker.nats_url, "test-hub-peer", None, None, "_INBOX_hubp")
    hub = LinkHub(nc)
    wildcard = SUBJECTS.agent_sessions_out("h1")
    before = len(nc._subs)
    links = [SessionLink(nc, SUBJECTS.session_in("h1", f"s{i}"),
                         SUBJECTS.session_out("h1", f"s{i}"), frozenset((frames.STDOUT,)),
                         LinkSettings(heartbeat=5), hub=hub, hub_subject=wildcard)
             for i in range(3)]
    try:
        for link in links:
            await link.open()
        assert len(nc._subs) == before + 1
        await nc.flush()  # the server has the subscription before the other client sends
        for i in (2, 0):
            await sender.publish(SUBJECTS.session_out("h1", f"s{i}"),
                                 frames.encode(frames.STDOUT, 1, f"to s{i}".encode()))
        await sender.publish(SUBJECTS.session_out("h1", "nobody"),
                             frames.encode(frames.STDOUT, 1, b"dropped"))
        assert await asyncio.wait_for(links[2].recv(), 5) == (frames.STDOUT, b"to s2")
        assert await asyncio.wait_for(links[0].recv(), 5) == (frames.STDOUT, b"to s0")
        assert links[1].receiver.received == 0
    finally:
        for link in links:
            await link.close()
        await hub.close()
    assert len(nc._subs) == before
    await sender.close()
    await nc.close()


# --- the vfork child: the same as the fork, step for step ------------------------------

MODES = ["vfork", "fork"]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    if request.param == "vfork" and spawn._vspawn is None:
        pytest.skip("the C child (agent/runners/_vspawn.c) is not built here")
    monkeypatch.setenv("RUNE_SPAWN", request.param)
    return request.param


async def _run(plan: ChildPlan, terminal: bool = False) -> tuple[bytes, tuple[int, int]]:
    if terminal:
        master, slave = os.openpty()
        stdio = (slave, slave, slave)
    else:
        read, slave = os.pipe()
        master = read
        stdio = (os.open(os.devnull, os.O_RDONLY), slave, slave)
    try:
        child = await start_child(plan, stdio, terminal=slave if terminal else None)
    finally:
        for fd in set(stdio):
            os.close(fd)
    out = b""
    loop = asyncio.get_running_loop()
    while True:
        try:
            chunk = await loop.run_in_executor(None, os.read, master, 65536)
        except OSError:  # EIO: the terminal's last holder is gone
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return out, await child.wait()


async def test_reports_are_the_same_in_both_modes(mode, tmp_path):
    """127 / 126 and their messages, missing workdir, a NUL in argv, an empty argv."""
    env = {"PATH": "/usr/bin:/bin"}
    cases = [(["no-such-command-x"], "/", 127,
              'exec: "no-such-command-x": executable file not found in $PATH'),
             (["true"], str(tmp_path / "gone"), 126,
              f"workdir {tmp_path / 'gone'}: no such directory"),
             (["./nope"], "/", 127, 'exec: "./nope": no such file or directory'),
             ([str(tmp_path)], "/", 126, f'exec: "{tmp_path}": permission denied')]
    for argv, cwd, code, message in cases:
        with pytest.raises(CommandUnavailable) as info:
            await _run(ChildPlan(argv, env, cwd))
        assert (info.value.exit_code, str(info.value)) == (code, message)
    for argv in (["echo", "a\0b"], []):
        with pytest.raises(SpawnFailed, match="cannot start the command"):
            await _run(ChildPlan(argv, env, "/"))


async def test_child_leads_its_session_with_default_signals_and_no_stray_fds(mode, tmp_path):
    """setsid, signals back to default and unblocked, only stdio (and ls's own) open."""
    stray = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(stray, True)
    try:
        out, status = await _run(ChildPlan(
            ["sh", "-c", "exec cat /proc/self/stat /proc/self/status"],
            {"PATH": "/usr/bin:/bin"}, str(tmp_path), die_with=os.getpid()))
        fds, _ = await _run(ChildPlan(["sh", "-c", "exec ls /proc/self/fd"],
                                      {"PATH": "/usr/bin:/bin"}, "/"))
    finally:
        os.close(stray)
    assert status == (0, 0)
    stat = out.split(b")", 1)[1].split()
    pid = int(out.split()[0])
    assert int(stat[3]) == pid  # its own session (field 6 of /proc/pid/stat)
    fields = dict(line.split(b":\t", 1) for line in out.split(b"\n") if b":\t" in line)
    assert int(fields[b"SigIgn"], 16) == 0 and int(fields[b"SigBlk"], 16) == 0
    assert set(fds.split()) <= {b"0", b"1", b"2", b"3"}


async def test_terminal_child_has_it_as_controlling_terminal(mode):
    """A TTY child: the slave is its controlling terminal."""
    out, status = await _run(ChildPlan(["sh", "-c", "tty; exec cat /proc/self/stat"],
                                       {"PATH": "/usr/bin:/bin"}, "/"), terminal=True)
    assert status == (0, 0)
    assert out.startswith(b"/dev/pts/")
    assert int(out.split(b")", 1)[1].split()[4]) != 0  # tty_nr


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_user_switch_comes_before_the_directory_in_both_modes(mode, tmp_path):
    """As nobody: groups and ids switched; a root-only workdir is refused as nobody."""
    from rune.agent.account import Account

    nobody = Account.of("nobody")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(CommandUnavailable, match="permission denied") as denied:
        await _run(ChildPlan(["true"], {"PATH": "/bin"}, str(private), nobody))
    assert denied.value.exit_code == 126
    out, status = await _run(ChildPlan(["sh", "-c", "id -u; id -g; id -G"],
                                       {"PATH": "/usr/bin:/bin"}, "/", nobody))
    assert status == (0, 0)
    uid, gid, groups = out.decode().split("\n")[:3]
    assert (int(uid), int(gid)) == (nobody.uid, nobody.gid)
    assert {int(g) for g in groups.split()} == set(nobody.groups) | {nobody.gid}


def test_exec_open_in_a_batch_is_the_plain_request():
    """A batch entry is exactly the packed ExecOpen the plain request carries."""
    packed = frames.pack(ExecOpen(session_id="s", namespace="default", instance_id="i",
                                  argv=["true"]).model_dump())
    assert ExecOpen.model_validate(frames.unpack(packed)).argv == ["true"]


def test_a_plan_with_isolation_takes_the_python_child():
    """Isolation is Python run in the child (agent/isolation.py): such a plan forks."""
    plain = ChildPlan(["true"], {}, "/")
    isolated = ChildPlan(["true"], {}, "/", isolation=object())  # type: ignore[arg-type]
    assert not spawn._use_vfork(isolated)
    assert spawn._use_vfork(plain) == (spawn._vspawn is not None
                                       and os.environ.get("RUNE_SPAWN") != "fork")
