"""Runs the sections in order; a section whose module has not landed yet still gets its rows."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import time

from bench import aio, rows
from bench.context import BenchContext

# (module in bench/, section title, the rows it promises: shown as "not landed" without it)
SECTIONS: list[tuple[str, str, list[str]]] = [
    ("setup_latency", "1. setup latency of `true`", []),
    ("throughput", "2. stdout throughput", []),
    ("keystroke_echo", "3. keystroke echo through a TTY (`cat`)",
     ["rune exec -t cat", "ssh -tt cat", "local PTY"]),
    ("fanout", "4. fan-out of `true`",
     ["rune fan-out to 10 instances", "rune fan-out to 100 instances",
      "rune fan-out to 500 instances"]),
    ("concurrency", "5. idle sessions held open", []),
    ("docker_vs_rune", "extra: rune into Docker containers vs docker exec",
     ["rune exec into a container vs docker exec"]),
    ("mux", "6. the CLI multiplexer", []),
    ("cp", "extra: rune cp vs scp and docker cp",
     ["rune cp 1 GiB file upload and download vs scp", "rune cp 10,000 small files vs scp",
      "rune cp 1 GiB file and 10,000 small files vs docker cp"]),
]


def section_names() -> list[str]:
    return [name for name, _, _ in SECTIONS]


def run_section(name: str, title: str, promised: list[str], ctx: BenchContext) -> list[dict]:
    """Imports bench.<name> by name and runs it; never raises."""
    if importlib.util.find_spec(f"bench.{name}") is None:
        return [rows.absent(f"{name}.{i}", title, label, rows.NOT_LANDED,
                            f"bench/{name}.py is not in this checkout yet")
                for i, label in enumerate(promised or [name])]
    try:
        module = importlib.import_module(f"bench.{name}")
        run = getattr(module, "run", None)
        if run is None:
            raise RuntimeError(f"bench/{name}.py has no run(ctx)")
        result = run(ctx)
        if inspect.isawaitable(result):
            result = aio.run(result)
        if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
            raise RuntimeError(f"bench/{name}.py run(ctx) did not return a list of rows")
        return result
    except Exception as exc:
        return [rows.absent(f"{name}.error", title, name, rows.ERROR,
                            f"{type(exc).__name__}: {exc}")]


def run_all(ctx: BenchContext, only: list[str] | None = None) -> tuple[list[dict], dict]:
    """All sections (or ONLY those), in order; returns rows and seconds per section."""
    by_section: dict[str, list[dict]] = {}
    timings: dict[str, float] = {}
    # Memory per idle session is measured first, before the 1 GiB runs inflate the heaps.
    run_order = sorted(SECTIONS, key=lambda section: section[0] != "concurrency")
    for name, title, promised in run_order:
        if only and name not in only:
            continue
        began = time.monotonic()
        print(f"bench: {title} …", file=sys.stderr, flush=True)
        by_section[name] = run_section(name, title, promised, ctx)
        timings[name] = round(time.monotonic() - began, 1)
    out = [row for name, _, _ in SECTIONS for row in by_section.get(name, [])]
    rows.attach_ratios(out)
    return out, timings
