"""The environment an instance and its execs start with: built, never inherited.

Nothing of the agent's own environment reaches a command (no SSH_AUTH_SOCK, no cloud
credentials, no NATS settings). An instance gets, in order of precedence:

    the service's `env:`  >  RUNE_NAMESPACE, RUNE_SERVICE, RUNE_INSTANCE, RUNE_AGENT
    >  PATH (a fixed system path), HOME, USER and LOGNAME (from its account)

and an exec gets the instance's environment, then TERM (under a TTY, default
xterm-256color), then the request's `--env`. LANG and LC_* appear only when the service
or `--env` gives them. Runners that start commands themselves (the process runner) call
these; a container's own environment comes from its image and the engine.
"""

from __future__ import annotations

from collections.abc import Mapping

from rune.agent.account import Account

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TERM = "xterm-256color"


def instance_environment(account: Account, service_env: Mapping[str, str],
                         rune_vars: Mapping[str, str]) -> dict[str, str]:
    env = {"PATH": SYSTEM_PATH, "HOME": account.home, "USER": account.name,
           "LOGNAME": account.name}
    env.update(rune_vars)
    env.update(service_env)
    return env


def exec_environment(instance_env: Mapping[str, str], request_env: Mapping[str, str],
                     tty: bool) -> dict[str, str]:
    env = dict(instance_env)
    if tty:
        env.setdefault("TERM", DEFAULT_TERM)
    env.update(request_env)
    return env
