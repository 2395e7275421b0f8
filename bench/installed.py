"""rune as users install it: the wheel built from this tree, in a fresh venv.

The tests run an editable install (`pip install -e`): setuptools then puts an import
finder into every interpreter start, which loads pathlib and importlib.util (30-40 ms
here) before `rune` runs a line. A wheel install has none of that, so the rows about
the CLI's own start time measure this install, and say so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from bench.context import ROOT

# What a wheel build must not see: its own output next to the sources, and what is not shipped.
NOT_SHIPPED = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "tests", "bench",
               "*.so")


def build_wheel(into: Path, source: Path = ROOT) -> Path:
    """The project's wheel, built from a copy of SOURCE (the build writes next to its input)."""
    copy = into / "source"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    dist = into / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(copy)], check=True, timeout=600,
                   capture_output=True)
    shutil.rmtree(copy, ignore_errors=True)
    return next(dist.glob("rune_exec-*.whl"))


def wheel_venv(into: Path, wheel: Path) -> Path:
    """A venv at INTO with WHEEL installed; its dependencies come from this interpreter's.

    Returns the venv's site-packages. Only a path line points at ours: the .pth files
    there (the editable install's finder among them) are not run by the new interpreter.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(into)], check=True,
                   timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(into), "platbase": str(into)}))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(into / "bin" / "python"),
                    "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   timeout=300, capture_output=True)
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return site


def installed_rune(workdir: Path) -> Path:
    """The `rune` script of a wheel install under WORKDIR, built once per bench run (the
    sections that time the whole CLI process share it)."""
    install = workdir / "wheel-install"
    script = install / "venv" / "bin" / "rune"
    if not script.exists():
        install.mkdir(exist_ok=True)
        wheel_venv(install / "venv", build_wheel(install))
    return script
