"""The user's config file (~/.config/rune/config.yaml): fills flags the user did not give."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_API_SERVER = "localhost:8443"


def config_path() -> Path:
    explicit = os.environ.get("RUNE_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "rune" / "config.yaml"


@dataclass
class UserConfig:
    api_server: str | None = None
    token_file: str | None = None
    namespace: str | None = None
    ca_file: str | None = None


def load_user_config() -> UserConfig:
    path = config_path()
    if not path.is_file():
        return UserConfig()
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    fields = UserConfig.__dataclass_fields__
    known = {k: data.get(k) or data.get(k.replace("_", "-")) for k in fields}
    return UserConfig(**{k: str(v) for k, v in known.items() if v is not None})


def save_user_config(config: UserConfig) -> Path:
    import yaml

    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in config.__dict__.items() if v is not None}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
