"""Hosts that defend themselves: each attack of the host-defence review, on a real secured
stack (nats-server with nkeys, apiserver with tokens and RBAC, two root agents whose
instances run as an unprivileged user), refused or harmless."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nats
import pytest
import yaml
from rune.apiserver.tokens import digest, new_token
from rune.cli.devstack import DEMO_ACCOUNT, DEV_USER, Stack, dev_auth, free_port, wait_until

from rune import frames

ROOT = Path(__file__).resolve().parents[2]
SLEEP = ["sh", "-c", "exec sleep 2147483647"]
USER = "nobody"
BLOCKED = ["rm -rf", "mkfs", "dd", "shutdown"]
# The session core passes --env to authorize and picks exec-tty by needs_tty_verb (and
# records such sessions); until it has landed these attacks are refused only in part.
CORE = importlib.util.find_spec("rune.apiserver.admission") is not None
needs_core = pytest.mark.skipif(not CORE, reason="needs the session core (apiserver/"
                                "admission.py) passing env= and needs_tty_verb to authorize")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agents must run as root to "
                                "switch to the instances' user")


def _token_file(path: Path, token: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostdefence")
    stack = Stack(tmp, nats_port=free_port(), api_port=free_port())
    extra = {"sam": new_token(), "nott": new_token()}
    auth = dev_auth("admin", {})
    auth["roles"]["developer"]["blocked_commands"] = BLOCKED
    auth["roles"]["support"] = {"verbs": ["exec", "list"], "namespaces": ["prod"],
                                "allowed_commands": ["ls", "cat", "git status", "id"]}
    auth["roles"]["notty"] = {"verbs": ["exec", "list"], "namespaces": ["default"]}
    auth["bindings"] += [{"role": "support", "users": ["sam"]},
                         {"role": "notty", "users": ["nott"]}]
    auth["tokens"] = [{"user": u, "sha256": digest(t)} for u, t in extra.items()]
    stack.secure(["h1", "h2"], admin="admin", auth=auth)
    for user, token in extra.items():
        stack.token_files[user] = _token_file(tmp / "tokens" / f"{user}.token", token)
    secret = f"sekrit-{uuid.uuid4().hex}"
    saved = dict(os.environ)
    os.environ["AWS_SECRET_ACCESS_KEY"] = secret  # the agents' environment, not the commands'
    try:
        stack.start_nats()
        stack.start_apiserver({"agents": {"h1": {"namespaces": ["default"]}}})
        stack.start_agent("h1", [{"name": "api", "replicas": 1, "command": SLEEP,
                                  "user": USER}])
        stack.start_agent("h2", [{"name": "api", "replicas": 1, "command": SLEEP, "user": USER},
                                 {"name": "db", "namespace": "prod", "replicas": 1,
                                  "command": SLEEP, "user": USER}])
    except BaseException:
        stack.stop()
        raise
    finally:
        os.environ.clear()
        os.environ.update(saved)
    stack.secret = secret
    yield stack
    stack.stop()


def rune(stack: Stack, user: str, *args: str, stdin: bytes | None = None
         ) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUNE_CONFIG": str(stack.state_dir / "none.yaml"),
           "RUNE_TOKEN_FILE": str(stack.token_files[user])}
    head = 2 if args[0] == "sessions" else 1  # `rune sessions list --api-server …`
    return subprocess.run([sys.executable, "-m", "rune.cli.main", *args[:head], "--api-server",
                           stack.api_address, *args[head:]], capture_output=True, text=True,
                          timeout=90, cwd=ROOT, env=env,
                          input=stdin.decode() if stdin is not None else None,
                          stdin=subprocess.DEVNULL if stdin is None else None)


def refused(result: subprocess.CompletedProcess, why: str) -> None:
    assert result.returncode == 255, result.stdout + result.stderr
    assert result.stderr.startswith("Error: "), result.stderr
    assert why in result.stderr, result.stderr


@pytest.fixture
def victim(tmp_path):
    """A directory the attacks try to delete; it must survive them."""
    target = tmp_path / "victim"
    target.mkdir()
    (target / "keep").write_text("x")
    os.chmod(tmp_path, 0o755)
    return target


# --- command policy --------------------------------------------------------------------

def test_git_config_injection_through_options_is_refused(fleet):
    """`git -c core.fsmonitor=… status` is not `git status`: the full argv prefix counts."""
    result = rune(fleet, "sam", "exec", "-n", "prod", "db", "git", "-c",
                  "core.fsmonitor=id >&2", "status")
    refused(result, "not in the allowed commands")


@needs_core
@pytest.mark.parametrize("env", [
    ["-e", "GIT_CONFIG_COUNT=1", "-e", "GIT_CONFIG_KEY_0=core.fsmonitor",
     "-e", "GIT_CONFIG_VALUE_0=id >&2"],
    ["-e", "PATH=/tmp"], ["-e", "LD_PRELOAD=/tmp/evil.so"],
])
def test_env_escapes_under_an_allowlist_are_refused(fleet, env):
    """The git env escape, PATH and LD_PRELOAD: refused for a role with an allowlist."""
    result = rune(fleet, "sam", "exec", "-n", "prod", *env, "db", "git", "status")
    refused(result, "environment variable")


@pytest.mark.parametrize("argv", [["/tmp/anywhere/ls"], ["./ls"], ["sh", "-c", "ls"]])
def test_allowlisted_name_from_another_directory_is_refused(fleet, argv):
    """`/any/dir/ls` is not `ls`: only the trusted directories' copies count."""
    refused(rune(fleet, "sam", "exec", "-n", "prod", "db", *argv), "not in the allowed")


def test_allowlist_still_runs_what_it_lists(fleet):
    """The support role's own commands work, also by their system path."""
    result = rune(fleet, "sam", "exec", "-n", "prod", "db", "/usr/bin/id", "-un")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == USER


BYPASSES = [
    ["rm", "-Rf", "{v}"], ["rm", "--recursive", "--force", "{v}"], ["rm", "--rec", "--for", "{v}"],
    ["env", "-S", "rm -rf {v}"], ["flock", "/tmp/rune-sec.lock", "rm", "-rf", "{v}"],
    ["setpriv", "--", "rm", "-rf", "{v}"], ["unshare", "rm", "-rf", "{v}"],
    ["chroot", "/", "rm", "-rf", "{v}"], ["nsenter", "rm", "-rf", "{v}"],
    ["runuser", "-u", USER, "--", "rm", "-rf", "{v}"], ["strace", "rm", "-rf", "{v}"],
    ["watch", "rm", "-rf", "{v}"], ["script", "-c", "rm -rf {v}", "/dev/null"],
    ["xargs", "rm", "-rf", "{v}"], ["/lib64/ld-linux-x86-64.so.2", "/bin/rm", "-rf", "{v}"],
    ["mkfs.ext4", "{v}/keep"],
]


def test_every_blocklist_bypass_is_refused(fleet, victim):
    """Each listed blocklist bypass is refused with a clear error and deletes nothing."""
    def attempt(argv: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
        argv = [a.replace("{v}", str(victim)) for a in argv]
        return argv, rune(fleet, DEV_USER, "exec", "api", *argv)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, BYPASSES))
    for argv, result in results:
        assert result.returncode == 255, (argv, result.stdout, result.stderr)
        assert result.stderr.startswith("Error: "), (argv, result.stderr)
        assert "blocked pattern" in result.stderr, (argv, result.stderr)
    assert (victim / "keep").exists()
    assert rune(fleet, DEV_USER, "exec", "api", "echo", "still-fine").stdout == "still-fine\n"


# --- privileges first, clean environment -------------------------------------------------

def test_commands_run_as_the_instance_user_with_a_clean_environment(fleet):
    """Not root, and none of the agent's own environment (its cloud secret) reaches them."""
    result = rune(fleet, "admin", "exec", "api", "sh", "-c", "id -un; env")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == USER
    env = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    assert fleet.secret not in result.stdout
    assert "AWS_SECRET_ACCESS_KEY" not in env and "NATS_URL" not in env
    assert env["USER"] == USER and env["PATH"].startswith("/usr/local/sbin")
    assert env["RUNE_SERVICE"] == "api"


@pytest.fixture
def open_dir():
    """A directory everyone may enter (pytest's own tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="rune-sec-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def private_dir(open_dir):
    """A root-only directory (0700) with an executable in it, on a traversable path."""
    private = open_dir / "private"
    private.mkdir(mode=0o700)
    tool = private / "tool"
    tool.write_text("#!/bin/sh\necho ran\n")
    os.chmod(tool, 0o755)
    return private


def test_workdir_and_binary_the_user_can_reach_work(fleet, private_dir):
    """The control for the two tests below: opened up, the same directory and tool work."""
    os.chmod(private_dir, 0o755)
    result = rune(fleet, "admin", "exec", "--workdir", str(private_dir), "api", "./tool")
    assert (result.returncode, result.stdout) == (0, "ran\n"), result.stderr


@pytest.mark.parametrize("tty", [[], ["-t"]])
def test_workdir_the_user_cannot_enter_fails_as_that_user(fleet, private_dir, tty):
    """`--workdir` into a root-only directory: permission denied (126), not success."""
    result = rune(fleet, "admin", "exec", *tty, "--workdir", str(private_dir), "api", "pwd")
    assert result.returncode == 126, result.stdout + result.stderr
    assert "permission denied" in (result.stderr + result.stdout)
    assert str(private_dir) + "\n" not in result.stdout


@pytest.mark.parametrize("tty", [[], ["-t"]])
def test_root_only_binary_is_not_found(fleet, private_dir, tty):
    """A binary only root can reach is 127 for the instance's user, and never runs."""
    result = rune(fleet, "admin", "exec", *tty, "api", str(private_dir / "tool"))
    assert result.returncode == 127, result.stdout + result.stderr
    assert "ran" not in result.stdout


def test_missing_command_and_workdir_under_a_tty(fleet):
    """PTY spawn failures are reported from the child: 127, and 126 for a missing workdir."""
    assert rune(fleet, "admin", "exec", "-t", "api", "/no/such/cmd").returncode == 127
    missing = rune(fleet, "admin", "exec", "-t", "--workdir", "/no/such/dir", "api", "true")
    assert missing.returncode == 126
    assert "no such directory" in missing.stderr + missing.stdout


# --- the agent trusts no caller ----------------------------------------------------------

async def _raw_requests(stack: Stack, payloads: list[bytes]) -> list[dict]:
    nc = await nats.connect(stack.nats_url, nkeys_seed=stack.nkey("apiserver"),
                            inbox_prefix=b"_INBOX_rune.apiserver")
    try:
        replies = []
        for payload in payloads:
            reply = await nc.request("rune.agent.h1.exec", payload, timeout=10)
            replies.append(frames.unpack(reply.data))
        return replies
    finally:
        await nc.close()


def test_agent_answers_every_bad_open_request_with_an_error(fleet):
    """Out-of-bounds and malformed open requests get an error reply; the agent carries on."""
    good = {"session_id": "s" * 32, "namespace": "default", "instance_id": "api-instance-h1-0",
            "argv": ["true"]}
    bad = [{**good, "width": 70000}, {**good, "namespace": "default\n"}, {**good, "argv": []},
           {**good, "timeout": float("nan")}, {**good, "env": {"A=B": "x"}},
           {**good, "workdir": "relative"}, {**good, "argv": ["a\0b"]},
           {**good, "argv": "not a list"}, {**good, "window": -1}, [1, 2, 3], "text", 7]
    payloads = [frames.pack(b) for b in bad] + [b"\xff\x00garbage"]
    replies = asyncio.run(_raw_requests(fleet, payloads))
    for request, reply in zip(bad + ["garbage"], replies, strict=True):
        assert reply["ok"] is False, request
        assert reply["error"]["code"] == "invalid_argument", (request, reply)
    assert rune(fleet, "admin", "exec", "api", "echo", "alive").stdout == "alive\n"


# --- credentials with no reach -----------------------------------------------------------

async def _as_agent(stack: Stack, agent: str, action) -> list[str]:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(stack.nats_url, nkeys_seed=stack.nkey(f"agent-{agent}"),
                            inbox_prefix=f"_INBOX_rune.agent.{agent}".encode(),
                            error_cb=on_error, allow_reconnect=False)
    try:
        await action(nc)
        await nc.flush()
        await asyncio.sleep(0.5)
    finally:
        await nc.close()
    return errors


def _forge_entry(key: str, namespace: str, instance_id: str, service: str):
    async def put(nc) -> None:
        js = nc.jetstream()
        kv = await js.key_value("rune_instances")
        await kv.put(key, json.dumps({
            "namespace": namespace, "service": service, "instance_id": instance_id,
            "state": "running", "agent": "h1", "host": "evil", "runner": "process"}).encode())
    return put


def _delete_entry(key: str):
    async def delete(nc) -> None:
        kv = await nc.jetstream().key_value("rune_instances")
        await kv.delete(key)
    return delete


def test_forged_entry_outside_the_agents_namespaces_is_ignored(fleet):
    """h1 is bound to default: its claim of prod's db instance is ignored; db stays h2's."""
    key = "h1.prod.db-instance-h2-0"
    asyncio.run(_as_agent(fleet, "h1", _forge_entry(key, "prod", "db-instance-h2-0", "db")))
    try:
        listed = rune(fleet, "admin", "instances", "-n", "prod")
        assert listed.returncode == 0
        rows = [line.split() for line in listed.stdout.splitlines()[1:]]
        assert [r[2:4] for r in rows] == [["db-instance-h2-0", "running"]], listed.stdout
        assert "evil" not in listed.stdout
        ran = rune(fleet, "admin", "exec", "-n", "prod", "db-instance-h2-0", "sh", "-c",
                   "echo $RUNE_AGENT", stdin=b"")
        assert ran.stdout == "h2\n", ran.stderr
        log = (fleet.logs / "apiserver.log").read_text()
        assert log.count(f"ignoring registry entry {key}") == 1
    finally:
        asyncio.run(_as_agent(fleet, "h1", _delete_entry(key)))


def test_instance_id_claimed_by_two_agents_is_a_conflict(fleet):
    """h1 claims h2's api instance id: both show `conflict`, exec is refused until it goes."""
    key = "h1.default.api-instance-h2-0"
    asyncio.run(_as_agent(fleet, "h1", _forge_entry(key, "default", "api-instance-h2-0", "api")))
    try:
        wait_until(lambda: "conflict" in rune(fleet, "admin", "instances").stdout, "conflict")
        result = rune(fleet, "admin", "exec", "api-instance-h2-0", "cat")
        refused(result, "claimed by more than one agent (h1, h2)")
        fan = rune(fleet, "admin", "exec", "api", "--all", "sh", "-c", "echo $RUNE_AGENT")
        assert fan.returncode == 0, fan.stderr
        assert "h2" not in fan.stdout and "h1" in fan.stdout
    finally:
        asyncio.run(_as_agent(fleet, "h1", _delete_entry(key)))
    wait_until(lambda: "conflict" not in rune(fleet, "admin", "instances").stdout, "no conflict")
    ran = rune(fleet, "admin", "exec", "api-instance-h2-0", "sh", "-c", "echo $RUNE_AGENT")
    assert ran.stdout == "h2\n"


def test_agent_cannot_publish_audit_as_the_apiserver_or_another_agent(fleet):
    """An agent credential publishes audit only under rune.audit.<ns>.agent.<its id>."""
    forged = json.dumps({"version": 1, "event": "session.started", "user": "alice",
                         "source": "apiserver"}).encode()

    async def publish(nc) -> None:
        await nc.publish("rune.audit.prod.session.started", forged)
        await nc.publish("rune.audit.prod.agent.h2.session.failed", forged)
        await nc.publish("rune.audit.prod.agent.h1.session.failed", b"{}")

    errors = asyncio.run(_as_agent(fleet, "h1", publish))
    violations = " ".join(errors).lower()
    assert "permissions violation" in violations
    assert '"rune.audit.prod.session.started"' in violations
    assert '"rune.audit.prod.agent.h2.session.failed"' in violations
    assert "agent.h1" not in violations


# --- interactive shells are recorded ---------------------------------------------------

@needs_core
def test_non_tty_interactive_shell_needs_exec_tty_and_is_recorded(fleet):
    """`rune exec --no-tty api sh` needs exec-tty, and with it is recorded."""
    refused(rune(fleet, "nott", "exec", "--no-tty", "api", "sh", stdin=b"id\n"), "exec-tty")
    refused(rune(fleet, "nott", "exec", "api", "script", "-qfc", "sh", "/dev/null",
                 stdin=b"id\n"), "exec-tty")
    marker = uuid.uuid4().hex
    ran = rune(fleet, "admin", "exec", "--no-tty", "api", "sh", stdin=f"echo {marker}\n".encode())
    assert ran.returncode == 0 and marker in ran.stdout
    listed = rune(fleet, "admin", "sessions", "list")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert any(row[1] == "recorded" and row[-1] == "sh" for row in rows), listed.stdout


# --- the agent's own files ---------------------------------------------------------------

def _agent_with_state_dir(tmp_path: Path, state_dir: Path) -> subprocess.CompletedProcess:
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"agent_id": "lone", "state_dir": str(state_dir),
                                      "nats": {"url": f"nats://127.0.0.1:{free_port()}"}}))
    return subprocess.run([sys.executable, "-m", "rune.agent.main", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_planted_symlink_at_the_state_dir_is_refused(tmp_path):
    """A symlink where the state dir should be: the agent refuses to start, and says why."""
    target = tmp_path / "etc-like"
    target.mkdir()
    planted = tmp_path / "rune-agent"
    planted.symlink_to(target)
    result = _agent_with_state_dir(tmp_path, planted)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: state directory")
    assert "symbolic link" in result.stderr
    assert not (target / "instances").exists()


def test_state_dir_owned_by_someone_else_is_refused(tmp_path):
    """A pre-made state dir owned by another user is refused, never chowned or used."""
    os.chmod(tmp_path, 0o755)
    planted = tmp_path / "rune-agent"
    planted.mkdir()
    shutil.chown(planted, USER)
    result = _agent_with_state_dir(tmp_path, planted)
    assert result.returncode == 1
    assert "is owned by uid" in result.stderr
    assert not (planted / "instances").exists()


# --- the dev stack -----------------------------------------------------------------------

def test_dev_user_cannot_read_tokens_or_seeds(tmp_path):
    """`rune dev up`: demo instances run as rune-demo, so `dev` reads no token or seed."""
    env = {**os.environ, "RUNE_CONFIG": str(tmp_path / "config.yaml")}
    env.pop("RUNE_TOKEN_FILE", None)
    state = tmp_path / "state"
    cli = [sys.executable, "-m", "rune.cli.main"]
    up = subprocess.run([*cli, "dev", "up", "--detach", "--state-dir", str(state),
                         "--nats-port", str(free_port()), "--api-port", str(free_port())],
                        capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        assert f"as user {DEMO_ACCOUNT}" in up.stdout
        dev_env = {**env, "RUNE_TOKEN_FILE": str(state / "tokens" / "dev.token")}
        admin_token = next((state / "tokens").glob("*.token"))
        secrets = [p for p in (state / "tokens").glob("*.token")] + \
            list((state / "broker").glob("*.nk"))
        script = "id -un; " + "; ".join(f"cat {p} ../../../../tokens/{p.name}"
                                        for p in secrets)
        result = subprocess.run([*cli, "exec", "api", "sh", "-c", script + "; true"],
                                capture_output=True, text=True, timeout=90, cwd=ROOT,
                                env=dev_env, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == DEMO_ACCOUNT
        assert "Permission denied" in result.stderr
        for path in secrets:
            assert path.read_text().strip() not in result.stdout + result.stderr, path
        assert admin_token.exists()
    finally:
        subprocess.run([*cli, "dev", "down", "--state-dir", str(state)], capture_output=True,
                       timeout=120, cwd=ROOT, env=env)
