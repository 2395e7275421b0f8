"""Command policy that holds: each bypass of the old allowlist and blocklist, refused."""

from __future__ import annotations

import pytest
from rune.apiserver.auth import Identity
from rune.apiserver.config import AuthConfig, CommandRules
from rune.apiserver.policy import CommandPolicy
from rune.apiserver.rbac import RoleAuthorizer, needs_tty_verb, verb_warnings

from rune.errors import PermissionDenied

SUPPORT = CommandPolicy.build(["ls", "cat", "git status"], None)
BLOCKED = CommandPolicy.build(None, ["rm -rf", "mkfs", "dd"])


@pytest.mark.parametrize("argv", [
    ["rm", "-Rf", "/x"], ["rm", "-fR", "/x"], ["rm", "--recursive", "--force", "/x"],
    ["rm", "--rec", "--for", "/x"], ["rm", "--recursive", "-f", "/x"], ["rm", "-r", "--f", "/x"],
    ["env", "-S", "rm -rf /x"], ["env", "-Srm -rf /x"], ["env", "--split-string=rm -rf /x"],
    ["xargs", "rm", "-rf"], ["flock", "/tmp/l", "rm", "-rf", "/x"],
    ["flock", "/tmp/l", "-c", "rm -rf /x"],
    ["setpriv", "--reuid=0", "rm", "-rf", "/x"], ["unshare", "-r", "rm", "-rf", "/x"],
    ["chroot", "/", "rm", "-rf", "/x"], ["nsenter", "-t", "1", "-m", "rm", "-rf", "/x"],
    ["runuser", "-u", "root", "--", "rm", "-rf", "/x"], ["runuser", "-c", "rm -rf /x", "root"],
    ["strace", "-f", "rm", "-rf", "/x"], ["watch", "rm", "-rf", "/x"], ["watch", "rm -rf /x"],
    ["script", "-c", "rm -rf /x", "/dev/null"], ["script", "-qfc", "rm -rf /x", "/dev/null"],
    ["/lib64/ld-linux-x86-64.so.2", "/bin/rm", "-rf", "/x"],
    ["/lib/ld-musl-x86_64.so.1", "rm", "-rf", "/x"],
    ["sudo", "env", "-S", "nice rm -rf /x"],
    ["mkfs.ext4", "/dev/sda1"], ["/sbin/mkfs.xfs", "/dev/sdb"], ["mkfs", "-t", "ext4", "/dev/x"],
    ["timeout", "5", "dd", "if=/dev/zero", "of=/dev/sda"],
])
def test_blocklist_bypasses_are_refused(argv):
    """Every blocklist hole of the old matcher is a match now."""
    assert "blocked pattern" in BLOCKED.refusal(argv)


@pytest.mark.parametrize("argv", [["rm", "-r", "/x"], ["rm", "--dir", "/x"], ["echo", "rm -rf"],
                                  ["mkfsx"], ["ls", "-rf"], ["rm", "--", "-rf"],
                                  ["chmod", "-r", "f"]])
def test_blocklist_still_lets_other_commands_through(argv):
    """Meaning-based matching is not a substring match."""
    assert BLOCKED.refusal(argv) is None


def test_chmod_minus_r_is_not_recursive():
    """Flag aliases are per command: chmod -r removes read permission, -R recurses."""
    policy = CommandPolicy.build(None, ["chmod -R"])
    assert policy.refusal(["chmod", "--recursive", "777", "/"])
    assert policy.refusal(["chmod", "-r", "f"]) is None


@pytest.mark.parametrize("argv", [
    ["/tmp/evil/ls"], ["./ls"], ["bin/ls"], ["/usr/bin/../../tmp/ls"],
    ["git", "-c", "core.fsmonitor=id", "status"], ["git", "--exec-path=/tmp", "status"],
    ["git", "stash"], ["sh", "-c", "ls"],
])
def test_allowlist_matches_the_command_itself_and_the_full_prefix(argv):
    """Allowlists match argv[0] as a bare name or a trusted path, then argv's exact prefix."""
    assert "not in the allowed" in SUPPORT.refusal(argv)


@pytest.mark.parametrize("argv", [["ls", "-la"], ["/bin/ls"], ["/usr/bin/cat", "/etc/hostname"],
                                  ["git", "status", "--short"]])
def test_allowlist_allows_what_it_lists(argv):
    assert SUPPORT.refusal(argv) is None


@pytest.mark.parametrize("env", [{"GIT_CONFIG_COUNT": "1"}, {"PATH": "/tmp"},
                                 {"LD_PRELOAD": "/tmp/x.so"}, {"PYTHONSTARTUP": "/x"},
                                 {"PERL5OPT": "-d"}, {"BASH_ENV": "/x"}, {"ENV": "/x"},
                                 {"HOME": "/tmp/evil"}])
def test_allowlist_refuses_environment_that_changes_what_runs(env):
    """Under an allowlist, env names that make a program load or run something are refused."""
    assert "environment variable" in SUPPORT.refusal(["git", "status"], env)


def test_allowed_env_lists_the_only_names():
    """With allowed_env, only those names (or prefixes) may be set, dangerous ones included."""
    policy = CommandPolicy.build(["ls"], None, allowed_env=["LANG", "LC_*", "PATH"])
    assert policy.refusal(["ls"], {"LANG": "C", "LC_ALL": "C", "PATH": "/bin"}) is None
    assert "not in the allowed env" in policy.refusal(["ls"], {"FOO": "1"})
    assert SUPPORT.refusal(["ls"], {"FOO": "1"}) is None  # no allowed_env: harmless names pass


def test_a_long_wrapped_argv_is_checked_in_one_pass():
    """A wrapper with thousands of arguments before `rm -rf` is still refused, quickly."""
    argv = ["env", *[f"A{i}=1" for i in range(30000)], "rm", "-rf", "/x"]
    assert "blocked" in BLOCKED.refusal(argv)


@pytest.mark.parametrize("argv,needs", [
    (["sh"], True), (["bash", "-i"], True), (["python3"], True), (["sh", "-s"], True),
    (["bash", "/dev/stdin"], True), (["script", "-qfc", "sh", "/dev/null"], True),
    (["script", "-q", "/dev/null"], True), (["env", "A=1", "bash"], True),
    (["sudo", "-i"], True), (["su"], True), (["timeout", "60", "python"], True),
    (["sh", "-c", "ls"], False), (["python3", "app.py"], False), (["ls"], False),
    (["script", "-c", "ls", "/dev/null"], False), (["psql", "-c", "select 1"], False),
])
def test_needs_tty_verb(argv, needs):
    """Interactive shells and interpreters need exec-tty with or without a TTY."""
    assert needs_tty_verb(argv) is needs


def _authorizer(roles: dict, bindings: list) -> RoleAuthorizer:
    return RoleAuthorizer(AuthConfig.model_validate({"roles": roles, "bindings": bindings}),
                          CommandRules())


def test_admin_verb_no_longer_implies_exec(caplog):
    """`admin` is the kill verb only; a config that relied on it for exec is warned about."""
    roles = {"ops": {"verbs": ["admin", "list"]}, "all": {"verbs": ["*"]}}
    with caplog.at_level("WARNING"):
        authz = _authorizer(roles, [{"role": "ops", "users": ["ann"]},
                                    {"role": "all", "users": ["root"]}])
    assert 'role "ops" grants "admin" but not "exec"' in caplog.text
    with pytest.raises(PermissionDenied, match="may not exec"):
        authz.authorize(Identity("ann"), "exec", "default", ["ls"])
    authz.authorize(Identity("ann"), "admin", "default")
    authz.authorize(Identity("root"), "exec", "default", ["ls"])
    assert verb_warnings(AuthConfig.model_validate({"roles": roles})) != []


def test_env_policy_through_authorize():
    """authorize(…, env=) applies the role's env policy; roles without an allowlist pass."""
    authz = _authorizer({"support": {"verbs": ["exec"], "allowed_commands": ["git status"]},
                         "dev": {"verbs": ["exec"]}},
                        [{"role": "support", "users": ["sam"]}, {"role": "dev", "users": ["dan"]}])
    with pytest.raises(PermissionDenied, match="GIT_CONFIG_COUNT"):
        authz.authorize(Identity("sam"), "exec", "default", ["git", "status"],
                        env={"GIT_CONFIG_COUNT": "1"})
    authz.authorize(Identity("sam"), "exec", "default", ["git", "status"])
    authz.authorize(Identity("dan"), "exec", "default", ["git", "status"],
                    env={"GIT_CONFIG_COUNT": "1"})


def test_an_argv_built_to_be_expensive_is_refused_not_slow():
    """`env rm rm rm …`: every tail a blocked command; refused after a few, as a shell."""
    argv = ["env", *["rm"] * 30000]
    assert "more than" in BLOCKED.refusal(argv)
    assert needs_tty_verb(["env", *["sh"] * 30000]) is True
