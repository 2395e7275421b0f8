"""RBAC: roles grant verbs in namespaces, bindings give roles to users and groups.

A request is allowed when some role bound to the caller grants the verb in the
namespace; for exec, the command (and its environment) must also pass the global and
namespace rules and the rules of at least one of those granting roles. Each verb means
only itself: `admin` (kill a session) grants no exec, `*` grants everything.

needs_tty_verb(argv) says when a session without a TTY still needs `exec-tty`: its
command is an interactive shell or interpreter (rune.interactive), also behind a
wrapper, or a wrapper that starts a login shell by itself (`script`, `su`, `sudo -i`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from rune.apiserver.auth import Identity
from rune.apiserver.config import AuthConfig, CommandRules, Role
from rune.apiserver.policy import (
    MAX_CANDIDATES,
    CommandPolicy,
    candidates,
    command_name,
    parse_flags,
)

from rune.errors import InvalidArgument, PermissionDenied
from rune.interactive import CLIENTS, INTERPRETERS, SHELLS, base_name, is_interactive_shell

log = logging.getLogger(__name__)

EXEC_VERBS = ("exec", "exec-tty")
# Wrappers that start a shell themselves when given no command to run.
_SHELL_BY_DEFAULT = {"script": ("c", "--command"), "su": ("c", "--command"),
                     "runuser": ("c", "--command"), "login": (), "machinectl": ()}
_SHELL_STARTERS = frozenset((*_SHELL_BY_DEFAULT, "sudo", "doas", "chroot", "unshare", "nsenter"))
_LOOKED_AT = 64  # a shell's first words decide: options, then its script (or -c)


def _policy(rules: CommandRules) -> CommandPolicy:
    try:
        return CommandPolicy.build(rules.allowed_commands, rules.blocked_commands,
                                   rules.allowed_env, rules.command_dirs)
    except ValueError as exc:
        raise InvalidArgument(f"bad command pattern in config: {exc}") from None


def _starts_a_shell(argv: Sequence[str]) -> bool:
    name = command_name(argv[0])
    flags, words = parse_flags(name, argv[1:])
    if name in _SHELL_BY_DEFAULT:
        return not flags & set(_SHELL_BY_DEFAULT[name])
    if name in ("sudo", "doas"):
        return bool(flags & {"i", "s", "--login", "--shell"})
    if name == "chroot":
        return len(words) <= 1
    if name in ("unshare", "nsenter"):
        return not words
    return False


def needs_tty_verb(argv: Sequence[str]) -> bool:
    """Whether argv is an interactive shell session even without a TTY (verb exec-tty)."""
    if not argv:
        return False
    checked = 0
    for line, start in candidates(argv):
        name = base_name(line[start])
        if name not in SHELLS and name not in INTERPRETERS and name not in CLIENTS \
                and name not in _SHELL_STARTERS:
            continue
        checked += 1
        if checked > MAX_CANDIDATES:
            return True  # built to be expensive: treat it as the shell it may well be
        # Only the first words decide; cutting later ones can only make it look interactive.
        head = list(line[start:start + _LOOKED_AT])
        if is_interactive_shell(head) or _starts_a_shell(head):
            return True
    return False


class RoleAuthorizer:
    def __init__(self, auth: AuthConfig, global_rules: CommandRules | None = None) -> None:
        self.roles = auth.roles
        self.bindings = auth.bindings
        self.role_policy = {name: _policy(role) for name, role in auth.roles.items()}
        self.namespace_policy = {ns: _policy(r) for ns, r in auth.namespaces.items()}
        self.global_policy = _policy(global_rules or CommandRules())
        unknown = {b.role for b in auth.bindings} - set(auth.roles)
        if unknown:
            raise InvalidArgument(f"bindings name unknown roles: {', '.join(sorted(unknown))}")
        for warning in verb_warnings(auth):
            log.warning("%s", warning)

    def _granting(self, identity: Identity, verb: str, namespace: str) -> list[str]:
        names = []
        for binding in self.bindings:
            if identity.user in binding.users or set(identity.groups) & set(binding.groups):
                role = self.roles[binding.role]
                if _grants(role, verb, namespace) and binding.role not in names:
                    names.append(binding.role)
        return names

    def allows(self, identity: Identity, verb: str, namespace: str) -> bool:
        return bool(self._granting(identity, verb, namespace))

    def authorize(self, identity: Identity, verb: str, namespace: str,
                  argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None) -> None:
        roles = self._granting(identity, verb, namespace)
        where = "in all namespaces" if namespace == "*" else f'in namespace "{namespace}"'
        if not roles:
            raise PermissionDenied(f'permission denied: user "{identity.user}" may not '
                                   f"{verb} {where}")
        if argv is None or verb not in EXEC_VERBS:
            return
        for layer in (self.global_policy, self.namespace_policy.get(namespace)):
            why = layer.refusal(argv, env) if layer else None
            if why:
                raise PermissionDenied(f"permission denied: {why}")
        refusals = [self.role_policy[r].refusal(argv, env) for r in roles]
        if all(refusals):
            raise PermissionDenied(f"permission denied: {refusals[0]} (role {roles[0]})")


def _grants(role: Role, verb: str, namespace: str) -> bool:
    verbs = set(role.verbs)
    verb_ok = "*" in verbs or verb in verbs
    ns_ok = "*" in role.namespaces or namespace in role.namespaces
    return verb_ok and ns_ok


def verb_warnings(auth: AuthConfig) -> list[str]:
    """Roles written when `admin` implied every verb: say which lost exec."""
    return [f'role "{name}" grants "admin" but not "exec": admin no longer implies exec '
            f'(or any other verb); add "exec" and "exec-tty", or use "*"'
            for name, role in auth.roles.items()
            if "admin" in role.verbs and "*" not in role.verbs and "exec" not in role.verbs]
