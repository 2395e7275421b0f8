"""The distribution installs under one `rune` namespace: a wheel in a fresh venv runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.conftest import ROOT

PROGRAMS = ("rune", "rune-apiserver", "rune-agent")


def test_wheel_installs_under_the_rune_namespace_and_runs(tmp_path: Path):
    """The wheel holds only rune/…; installed in a fresh venv, its three programs start."""
    dist, source = tmp_path / "dist", tmp_path / "source"
    # A copy: the wheel build writes build/ and *.egg-info next to the sources.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "tests", "bench"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(source)], check=True, timeout=300,
                   capture_output=True)
    wheel = next(dist.glob("rune_exec-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"rune"}
    names = zipfile.ZipFile(wheel).namelist()
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
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv),
                                                    "platbase": str(venv)}))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   timeout=300, capture_output=True)
    # The dependencies come from this interpreter's environment, not the project tree.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
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
