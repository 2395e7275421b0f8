"""The distribution installs under one `rune` namespace: a wheel in a fresh venv runs."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

from bench.installed import build_wheel, wheel_venv
from tests.conftest import ROOT

PROGRAMS = ("rune", "rune-apiserver", "rune-agent")


def test_wheel_installs_under_the_rune_namespace_and_runs(tmp_path: Path):
    """The wheel holds only rune/…; installed in a fresh venv, its three programs start."""
    wheel = build_wheel(tmp_path)
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"rune"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "rune_exec-0.1.0.data/scripts/rune" in names  # our launcher, not a generated one
    # Every package folder of the tree is in the wheel (the package list is written by hand).
    mapped = {"rune": "rune", "cli": "rune/cli", "agent": "rune/agent",
              "apiserver": "rune/apiserver", "broker_config": "rune/broker_config",
              "dashboard": "rune/dashboard"}
    for top, installed in mapped.items():
        for init in (ROOT / top).rglob("__init__.py"):
            inside = init.relative_to(ROOT / top).as_posix()
            assert f"{installed}/{inside}" in names, f"{top}/{inside} is not in the wheel"
    for module in ("rune/cli/main.py", "rune/agent/runners/process.py",
                   "rune/apiserver/session.py", "rune/broker_config/nats-single.conf",
                   "rune/proto/exec.proto"):
        assert module in names

    venv = tmp_path / "venv"
    site = wheel_venv(venv, wheel)
    assert not any((site / name).exists() for name in ("cli", "agent", "apiserver",
                                                       "broker_config"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for program in PROGRAMS:
        result = subprocess.run([str(venv / "bin" / program), "--help"], capture_output=True,
                                text=True, timeout=60, cwd=tmp_path, env=env)
        assert result.returncode == 0, (program, result.stderr)
        assert "usage" in result.stdout.lower()
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import rune.cli.main, rune.apiserver.session; "
                            "print(rune.cli.main.__file__)"], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path, env=env, check=True)
    assert where.stdout.startswith(str(site))
    _fast_path_is_light(venv, tmp_path, env)


# Each of these alone costs a warm `rune exec` more than the rest of its client: the
# generated console script's `re` (with enum), and json (which loads re).
HEAVY_FOR_THE_FAST_PATH = {"re", "enum", "json", "typing", "functools", "asyncio", "grpc",
                           "typer", "pydantic", "selectors", "socket", "signal"}


def _fast_path_is_light(venv: Path, cwd: Path, env: dict) -> None:
    """As installed from the wheel, `rune` and the multiplexer's client load nothing heavy."""
    shown = subprocess.run([str(venv / "bin" / "python"), "-X", "importtime",
                            str(venv / "bin" / "rune"), "--version"], capture_output=True,
                           text=True, timeout=60, cwd=cwd, env=env)
    assert shown.returncode == 0 and shown.stdout.startswith("rune "), shown.stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in shown.stderr.splitlines()
              if "import time:" in line}
    assert not loaded & HEAVY_FOR_THE_FAST_PATH, loaded & HEAVY_FOR_THE_FAST_PATH
    client = subprocess.run([str(venv / "bin" / "python"), "-c",
                             "import sys; before = set(sys.modules); "
                             "import rune.cli.entry, rune.cli.muxclient; "
                             "print(' '.join(sorted(set(sys.modules) - before)))"],
                            capture_output=True, text=True, timeout=60, cwd=cwd, env=env,
                            check=True)
    added = set(client.stdout.split())
    assert "rune.cli.muxwire" in added
    assert not added & HEAVY_FOR_THE_FAST_PATH, added & HEAVY_FOR_THE_FAST_PATH
