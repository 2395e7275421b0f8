"""The user's config file (~/.config/rune/config.yaml): fills flags the user did not give.

    api_server: localhost:8443          # used when no context is chosen
    token_file: ~/.config/rune/token
    namespace: default
    mux: auto                           # or off: every command runs in its own process
    current_context: prod               # `rune config use-context prod`
    contexts:
      prod: {api_server: "https://rune.example:8443", token_file: ~/.rune/prod.token,
             ca_file: ~/.rune/prod-ca.pem, namespace: payments}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_API_SERVER = "localhost:8443"
CONNECTION_KEYS = ("api_server", "token_file", "ca_file", "namespace")


def config_path(env: Mapping[str, str] | None = None, cwd: str | None = None) -> Path:
    env = os.environ if env is None else env
    explicit = env.get("RUNE_CONFIG")
    if explicit:
        return Path(cwd or os.getcwd()) / Path(explicit).expanduser()
    home = env.get("HOME") or str(Path.home())
    base = env.get("XDG_CONFIG_HOME") or str(Path(home) / ".config")
    return Path(base) / "rune" / "config.yaml"


@dataclass
class Context:
    """Where one apiserver is and how to sign in to it."""

    api_server: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    namespace: str | None = None


@dataclass
class UserConfig:
    api_server: str | None = None
    token_file: str | None = None
    namespace: str | None = None
    ca_file: str | None = None
    mux: str | None = None
    current_context: str | None = None
    contexts: dict[str, Context] = field(default_factory=dict)

    def context(self, name: str | None = None) -> Context:
        """The named (else current) context; without one, the top-level keys."""
        chosen = name or self.current_context
        if chosen:
            if chosen not in self.contexts:
                known = ", ".join(sorted(self.contexts)) or "none"
                raise ValueError(f"no context {chosen!r} in the config (known: {known})")
            found = self.contexts[chosen]
            return Context(**{k: getattr(found, k) or getattr(self, k)
                              for k in CONNECTION_KEYS})
        return Context(**{k: getattr(self, k) for k in CONNECTION_KEYS})


def _value(data: dict, key: str) -> str | None:
    found = data.get(key, data.get(key.replace("_", "-")))
    return None if found is None else str(found)


def load_user_config(env: Mapping[str, str] | None = None, cwd: str | None = None) -> UserConfig:
    path = config_path(env, cwd)
    if not path.is_file():
        return UserConfig()
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    raw_contexts = data.get("contexts") or {}
    if not isinstance(raw_contexts, dict):
        raise ValueError(f"{path}: contexts must be a mapping of name to settings")
    contexts = {}
    for name, body in raw_contexts.items():
        if not isinstance(body, dict):
            raise ValueError(f"{path}: context {name!r} must be a mapping")
        contexts[str(name)] = Context(**{k: _value(body, k) for k in CONNECTION_KEYS})
    plain = [f.name for f in fields(UserConfig) if f.name != "contexts"]
    return UserConfig(**{k: _value(data, k) for k in plain}, contexts=contexts)


def save_user_config(config: UserConfig, env: Mapping[str, str] | None = None,
                     cwd: str | None = None) -> Path:
    import yaml

    path = config_path(env, cwd)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in config.__dict__.items() if v is not None and k != "contexts"}
    if config.contexts:
        data["contexts"] = {name: {k: v for k, v in c.__dict__.items() if v is not None}
                            for name, c in config.contexts.items()}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
