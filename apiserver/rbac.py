"""RBAC: roles grant verbs in namespaces, bindings give roles to users and groups.

A request is allowed when some role bound to the caller grants the verb in the
namespace; for exec, the command must also pass the global and namespace rules
and the rules of at least one of those granting roles.
"""

from __future__ import annotations

from collections.abc import Sequence

from rune.apiserver.auth import Identity
from rune.apiserver.config import AuthConfig, CommandRules, Role
from rune.apiserver.policy import CommandPolicy

from rune.errors import InvalidArgument, PermissionDenied

EXEC_VERBS = ("exec", "exec-tty")


def _policy(rules: CommandRules) -> CommandPolicy:
    try:
        return CommandPolicy.build(rules.allowed_commands, rules.blocked_commands)
    except ValueError as exc:
        raise InvalidArgument(f"bad command pattern in config: {exc}") from None


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
                  argv: Sequence[str] | None = None) -> None:
        roles = self._granting(identity, verb, namespace)
        where = "in all namespaces" if namespace == "*" else f'in namespace "{namespace}"'
        if not roles:
            raise PermissionDenied(f'permission denied: user "{identity.user}" may not '
                                   f"{verb} {where}")
        if argv is None or verb not in EXEC_VERBS:
            return
        for layer in (self.global_policy, self.namespace_policy.get(namespace)):
            why = layer.refusal(argv) if layer else None
            if why:
                raise PermissionDenied(f"permission denied: {why}")
        refusals = [self.role_policy[r].refusal(argv) for r in roles]
        if all(refusals):
            raise PermissionDenied(f"permission denied: {refusals[0]} (role {roles[0]})")


def _grants(role: Role, verb: str, namespace: str) -> bool:
    verbs = set(role.verbs)
    verb_ok = "*" in verbs or "admin" in verbs or verb in verbs
    ns_ok = "*" in role.namespaces or namespace in role.namespaces
    return verb_ok and ns_ok
