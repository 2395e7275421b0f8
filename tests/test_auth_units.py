"""Unit tests of tokens, RBAC, command policy and input limits (no network)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest
import yaml
from rune.apiserver.admission import decode, exec_fields
from rune.apiserver.auth import Identity
from rune.apiserver.config import AuthConfig, CommandRules, LimitsConfig
from rune.apiserver.limits import SessionLimits
from rune.apiserver.policy import CommandPolicy, Pattern
from rune.apiserver.rbac import RoleAuthorizer
from rune.apiserver.tls import is_loopback
from rune.apiserver.tokens import TokenAuthenticator, create_token, digest, new_token

from rune.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from rune.proto import exec_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_token_authenticates_its_user_only():
    """A token maps to its user and groups; a wrong or missing token is refused."""
    token = new_token()
    auth = TokenAuthenticator(AuthConfig.model_validate({"tokens": [
        {"user": "ann", "groups": ["ops"], "sha256": digest(token)},
        {"user": "bob", "sha256": digest(new_token())}]}).tokens)
    assert auth.authenticate([("authorization", f"Bearer {token}")]) == Identity("ann", ("ops",))
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.authenticate([("authorization", f"Bearer {token}x")])
    with pytest.raises(Unauthenticated, match="no bearer token"):
        auth.authenticate([])
    with pytest.raises(Unauthenticated, match="malformed"):
        auth.authenticate([("authorization", f"Basic {token}")])


def test_tokens_are_long_and_random():
    """Tokens carry 256 random bits, so a SHA-256 of them cannot be brute-forced."""
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(t) >= 40 for t in tokens)


def test_token_create_writes_only_the_hash(tmp_path):
    """`rune-apiserver token create` prints the token once; the config keeps its SHA-256."""
    config = tmp_path / "apiserver.yaml"
    config.write_text(yaml.safe_dump({"listen": "127.0.0.1:1"}))
    result = subprocess.run([sys.executable, "-m", "rune.apiserver.main", "token", "create",
                             "--config", str(config), "--user", "ann", "--group", "ops",
                             "--group", "db"], capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    text = config.read_text()
    assert token not in text
    data = yaml.safe_load(text)
    assert data["listen"] == "127.0.0.1:1"
    assert data["auth"]["tokens"] == [{"user": "ann", "groups": ["ops", "db"],
                                       "sha256": hashlib.sha256(token.encode()).hexdigest()}]
    second = create_token(config, "bob")
    assert len(yaml.safe_load(config.read_text())["auth"]["tokens"]) == 2
    assert second != token
    fresh = tmp_path / "new.yaml"
    create_token(fresh, "cid")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


@pytest.mark.parametrize("argv", [["rm", "-rf", "/x"], ["/bin/rm", "-rf", "/x"],
                                  ["rm", "-fr", "/x"], ["rm", "-r", "-f", "/x"],
                                  ["rm", "-f", "/x", "-r"], ["rm", "-rfv", "/x"],
                                  ["sudo", "-u", "root", "rm", "-rf", "/x"],
                                  ["env", "A=1", "/usr/bin/rm", "-r", "-f", "/x"]])
def test_blocked_pattern_matches_parsed_argv(argv):
    """`rm -rf` is found by basename and flag set, combined or split, through wrappers."""
    policy = CommandPolicy.build(None, ["rm -rf"])
    assert "blocked" in policy.refusal(argv)


@pytest.mark.parametrize("argv", [["rm", "/x/file"], ["rm", "-r", "/x"], ["echo", "rm -rf"],
                                  ["firm", "-rf"], ["ls", "-rf"], ["rm", "--", "-rf"]])
def test_blocked_pattern_is_not_a_substring_match(argv):
    """Other commands, missing flags and quoted text do not match `rm -rf`."""
    assert CommandPolicy.build(None, ["rm -rf"]).refusal(argv) is None


def test_pattern_words_and_long_flags():
    """Positional words match as a leading sequence; long flags may carry =values."""
    assert Pattern.parse("git push").blocks(["git", "push", "origin"])
    assert not Pattern.parse("git push").blocks(["git", "pull"])
    assert Pattern.parse("git push --force").blocks(["git", "push", "--force=yes", "o"])
    assert not Pattern.parse("git push --force").blocks(["git", "push", "o"])


def test_allowlist_refuses_everything_else():
    """With an allowlist only listed commands run: a shell is refused."""
    policy = CommandPolicy.build(["ls", "cat"], None)
    assert policy.refusal(["ls", "-la"]) is None
    assert policy.refusal(["/bin/cat", "/etc/hostname"]) is None
    assert "not in the allowed" in policy.refusal(["sh", "-c", "ls"])


def _authorizer(**extra) -> RoleAuthorizer:
    auth = AuthConfig.model_validate({
        "roles": {
            "admin": {"verbs": ["*"], "namespaces": ["*"]},
            "dev": {"verbs": ["exec", "list"], "namespaces": ["default"],
                    "blocked_commands": ["rm -rf"]},
            "viewer": {"verbs": ["list"], "namespaces": ["default", "prod"]},
            "tty": {"verbs": ["exec-tty"], "namespaces": ["default"]},
        },
        "bindings": [{"role": "admin", "users": ["root"]},
                     {"role": "dev", "users": ["dan"], "groups": ["devs"]},
                     {"role": "viewer", "users": ["vic"]},
                     {"role": "tty", "groups": ["tty"]}],
        **extra})
    return RoleAuthorizer(auth, CommandRules())


def test_rbac_verbs_per_namespace():
    """A role grants its verbs only in its namespaces; groups bind like users."""
    authz = _authorizer()
    dan, vic, root = Identity("dan"), Identity("vic"), Identity("root")
    authz.authorize(dan, "exec", "default", ["ls"])
    authz.authorize(Identity("x", ("devs",)), "list", "default")
    with pytest.raises(PermissionDenied, match='may not exec in namespace "prod"'):
        authz.authorize(dan, "exec", "prod", ["ls"])
    with pytest.raises(PermissionDenied, match="may not list"):
        authz.authorize(dan, "list", "prod")
    with pytest.raises(PermissionDenied, match="may not exec-tty"):
        authz.authorize(dan, "exec-tty", "default", ["sh"])
    with pytest.raises(PermissionDenied):
        authz.authorize(vic, "exec", "default", ["ls"])
    authz.authorize(vic, "list", "prod")
    authz.authorize(root, "exec", "prod", ["rm", "-rf", "/"])
    assert authz.allows(vic, "list", "prod") and not authz.allows(dan, "list", "prod")
    with pytest.raises(PermissionDenied):
        authz.authorize(Identity("nobody"), "list", "default")


def test_command_policy_per_role_and_namespace():
    """Role rules bind the role; namespace and global rules bind everyone."""
    authz = _authorizer(namespaces={"prod": {"blocked_commands": ["shutdown"]}})
    with pytest.raises(PermissionDenied, match="blocked pattern"):
        authz.authorize(Identity("dan"), "exec", "default", ["rm", "-fr", "/x"])
    with pytest.raises(PermissionDenied, match="shutdown"):
        authz.authorize(Identity("root"), "exec", "prod", ["shutdown", "-h", "now"])
    # A user with admin too is not bound by the dev role's blocklist.
    both = Identity("dan", ("admins",))
    authz2 = RoleAuthorizer(AuthConfig.model_validate({
        "roles": {"admin": {"verbs": ["*"]}, "dev": {"verbs": ["exec"],
                                                     "blocked_commands": ["rm -rf"]}},
        "bindings": [{"role": "dev", "users": ["dan"]},
                     {"role": "admin", "groups": ["admins"]}]}),
        CommandRules(blocked_commands=["reboot"]))
    authz2.authorize(both, "exec", "default", ["rm", "-rf", "/x"])
    with pytest.raises(PermissionDenied, match="reboot"):
        authz2.authorize(both, "exec", "default", ["reboot"])


def test_unknown_role_in_binding_is_a_config_error():
    """A binding naming a missing role fails at start, not silently."""
    with pytest.raises(InvalidArgument, match="unknown roles"):
        RoleAuthorizer(AuthConfig.model_validate({"bindings": [{"role": "ghost"}]}))


@pytest.mark.parametrize("init, message", [
    (pb.ExecInit(target="api", command=["echo", "a\0b"]), "argv.*NUL"),
    (pb.ExecInit(target="api", command=["env"], env={"A": "x\0y"}), "env.*NUL"),
    (pb.ExecInit(target="api", command=["env"], env={"A=B": "x"}), "env name"),
    (pb.ExecInit(target="api", command=["pwd"], workdir="tmp"), "workdir.*absolute"),
    (pb.ExecInit(target="api", command=["echo", "x" * 200_000]), "argument 1 is too large"),
    (pb.ExecInit(target="api", command=["echo", *["x" * 1000] * 1100]), "command is too large"),
    (pb.ExecInit(target="api", command=["echo"] * 40000), "too many arguments"),
    (pb.ExecInit(target="api", command=["env"], env={"A": "x" * 70_000}), "env is too large"),
    (pb.ExecInit(target="api", namespace="default\n", command=["true"]), "namespace"),
    (pb.ExecInit(target="api\n", command=["true"]), "target"),
    (pb.ExecInit(target="a.b", command=["true"]), "target"),
    (pb.ExecInit(target="api", command=[]), "command is empty"),
    (pb.ExecInit(target="api", command=["true"], tty=True, width=70000), "width"),
    (pb.ExecInit(target="api", command=["true"], tty=True, height=2**32 - 1), "height"),
    (pb.ExecInit(target="api", command=["true"], timeout_seconds=float("nan")), "timeout"),
    (pb.ExecInit(target="api", command=["true"], timeout_seconds=float("inf")), "timeout"),
    (pb.ExecInit(target="api", command=["true"], timeout_seconds=-1), "timeout"),
    (pb.ExecInit(target="api", command=["true"], term="xterm\x1b[2J"), "TERM"),
])
def test_request_bounds(init, message):
    """Every field out of its bounds is an invalid argument naming the field."""
    with pytest.raises(InvalidArgument, match=message):
        decode(exec_fields(init), LimitsConfig(), 3600)


def test_request_bounds_accept_docker_scale_argv():
    """A 2001-argument, 200 KB command (fine under docker and kubectl) is accepted."""
    init = pb.ExecInit(target="api", command=["echo", *["y" * 99] * 2000])
    spec = decode(exec_fields(init), LimitsConfig(), 3600)
    assert len(spec.argv) == 2001


def test_session_limits_per_user_and_agent():
    """Past the maximum a new session is refused; ending one frees a slot."""
    limits = SessionLimits(LimitsConfig(max_sessions_per_user=2, max_sessions_per_agent=3))
    limits.acquire("ann", "h1")
    limits.acquire("ann", "h1")
    with pytest.raises(ResourceExhausted, match='user "ann"'):
        limits.acquire("ann", "h1")
    limits.acquire("bob", "h1")
    with pytest.raises(ResourceExhausted, match='agent "h1"'):
        limits.acquire("cid", "h1")
    limits.release("ann", "h1")
    limits.acquire("cid", "h1")


def test_session_limits_tell_a_users_room_here_and_elsewhere():
    """The room a fan-out may pace itself in: the cap less the user's sessions on this
    apiserver and on the others; None without a cap; never below zero."""
    others = {"ann": 1}
    limits = SessionLimits(LimitsConfig(max_sessions_per_user=4),
                           elsewhere=lambda user, agent: (others.get(user, 0), 0))
    assert limits.room("ann") == 3 and limits.room("bob") == 4
    limits.acquire("ann", "h1")
    limits.acquire("ann", "h2")
    assert limits.room("ann") == 1
    others["ann"] = 9
    assert limits.room("ann") == 0
    assert SessionLimits(LimitsConfig(max_sessions_per_user=0)).room("ann") is None


def test_loopback_detection():
    """Only loopback listen addresses may serve plaintext."""
    assert is_loopback("127.0.0.1:1") and is_loopback("localhost:1") and is_loopback("[::1]:1")
    assert not is_loopback("0.0.0.0:1") and not is_loopback("10.0.0.1:1")
    assert not is_loopback("example.com:1") and not is_loopback("[::]:1")


def test_plaintext_on_public_address_is_refused():
    """The apiserver will not serve plaintext beyond loopback without --insecure."""
    result = subprocess.run([sys.executable, "-m", "rune.apiserver.main", "--listen",
                             "0.0.0.0:1", "--nats-url", "nats://127.0.0.1:1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert "refusing to serve plaintext" in result.stderr


def test_cli_warns_about_exposed_token_file(tmp_path, capsys):
    """Like ssh, a token file readable by group or others draws a warning."""
    from rune.cli.tokens import read_token_file

    path = tmp_path / "token"
    path.write_text("secret\n")
    os.chmod(path, 0o600)
    assert read_token_file(str(path)) == "secret"
    assert capsys.readouterr().err == ""
    os.chmod(path, 0o644)
    assert read_token_file(str(path)) == "secret"
    err = capsys.readouterr().err
    assert "accessible by others" in err and "secret" not in err
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_no_limit_when_zero_and_unknown_verbs_rejected():
    """0 lifts a session limit; a role with an unknown verb is a config error."""
    limits = SessionLimits(LimitsConfig(max_sessions_per_user=0, max_sessions_per_agent=0))
    for _ in range(1000):
        limits.acquire("anonymous", "h1")
    with pytest.raises(ValueError, match="unknown verbs"):
        AuthConfig.model_validate({"roles": {"r": {"verbs": ["exce"]}}})
    role = AuthConfig.model_validate({"roles": {"r": {"verbs": ["exec:tty"]}}}).roles["r"]
    assert role.verbs == ["exec-tty"]


async def test_directory_believes_only_entries_under_their_agents_key():
    """A registry entry claiming another agent than its key's is ignored (forged routing)."""
    from types import SimpleNamespace

    from rune.apiserver.directory import InstanceDirectory

    from rune.models import InstanceInfo

    def entry(key: str, agent: str) -> SimpleNamespace:
        info = InstanceInfo(namespace="default", service="api", state="running",
                            instance_id=f"api-instance-{agent}-0", agent=agent, host="h",
                            runner="process")
        return SimpleNamespace(key=key, value=info.model_dump_json().encode(), operation="PUT")

    async def watcher():
        yield entry("a1.default.api-instance-a1-0", "a1")
        yield entry("a1.default.api-instance-b2-0", "b2")  # a1 pretending to route b2's
        yield None

    directory = InstanceDirectory(None, None)
    await directory._apply(watcher())
    assert list(directory.instances) == ["a1.default.api-instance-a1-0"]
    assert directory.resolve("default", "api-instance-a1-0").agent == "a1"


async def test_refusal_that_ends_the_call_before_init_is_still_reported():
    """A server that ends the call before the client writes init: the client reports its
    status (here UNAUTHENTICATED), not a write on a finished call."""
    import grpc
    from rune.cli.client import ApiClient, ExecOptions

    from rune.proto import exec_pb2_grpc as pb_grpc

    class Refusing(pb_grpc.ExecServiceServicer):
        async def StreamExec(self, request_iterator, context):  # noqa: N802
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "authentication failed: invalid token")

    server = grpc.aio.server()
    pb_grpc.add_ExecServiceServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with ApiClient(f"127.0.0.1:{port}", token="x") as client:
            stream = client.exec_stream()
            await stream.call.code()  # the RPC has ended before the client writes anything
            with pytest.raises(Unauthenticated, match="invalid token"):
                await stream.start(ExecOptions(target="api", command=["true"]))
    finally:
        await server.stop(None)
