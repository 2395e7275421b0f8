"""Fan-out of `true` with `rune exec SERVICE --all` to 10 … 5,000 instances; per instance; RSS.

    python bench/fanout.py [--runs 5] [--warmup 3] [--sizes 10,100,500,1000,5000]

Each size prints the whole CLI process's wall time and the cost per instance (wall / n),
with `rune` as users install it (the wheel of this tree, bench/installed.py: an editable
install adds its import hook, ~15 ms here, to every CLI start),
and the CPU per instance of each part (apiserver, nats-server, agents, their commands, the
multiplexer where the CLI's work runs): on a shared machine the steadier figure;
the goals (issue "fleet-scale rollouts"): 1,000 over 100 agents <= 2.0 s, 5,000 over 100
agents <= 8 s, and the cost per instance flat (+-20 %) from 100 to 5,000 (a last row).

Each size is a fleet of real agents (several per process, each its own NATS client)
started for it under the bench's stack and stopped after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":  # `python bench/fanout.py`: the repo root holds bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rune.cli.devstack import Stack, stop_pid  # noqa: E402

from bench import rows  # noqa: E402
from bench.context import ROOT, BenchContext, Sizes  # noqa: E402
from bench.installed import installed_rune  # noqa: E402
from bench.procs import timed_run  # noqa: E402
from tests.multi_agent import start_fleet  # noqa: E402

SECTION = "4. fan-out of `true`"
SINGLE = "mux.warm"  # one `rune exec api true` from the same wheel install, section 6
SHAPES = {10: (2, 5), 100: (10, 10), 500: (25, 20), 1000: (100, 10), 5000: (100, 50)}
# instances: (agents, replicas); the goals are 1,000 and 5,000 over 100 agents


def shape(size: int) -> tuple[int, int]:
    """Agents and replicas per agent for SIZE instances (at most 20 replicas per agent)."""
    if size in SHAPES:
        return SHAPES[size]
    agents = -(-size // 20)
    if size % agents:
        raise ValueError(f"{size} instances do not split evenly over {agents} agents")
    return agents, size // agents


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    """Samples a process's RSS every few milliseconds; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            self._halt.wait(0.005)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU (user + system) a process has used so far; with `children`, that of its reaped
    children (an agent's commands) instead. 0 for a process that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    first = 13 if children else 11
    return (int(fields[first]) + int(fields[first + 1])) / TICKS


def mux_pid(mux_dir: str) -> int | None:
    """The bench's own multiplexer (the CLI's work happens there), found by its --dir."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"rune.cli.muxserver" in argv and mux_dir.encode() in argv:
            return int(entry.name)
    return None


class CpuMeter:
    """CPU seconds each part of the stack spends over the timed runs: on a shared machine
    wall times swing with other work, CPU per process much less."""

    def __init__(self, stack: Stack, fleet: list[subprocess.Popen], mux: int | None) -> None:
        self.parts = {"apiserver": [stack.procs["apiserver"].pid],
                      "nats-server": [stack.procs["nats"].pid],
                      "agents": [p.pid for p in fleet], "multiplexer": [mux] if mux else []}
        self.began = self._now()

    def _now(self) -> dict[str, float]:
        now = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.parts.items()}
        now["agents' commands"] = sum(cpu_seconds(p, children=True)
                                      for p in self.parts["agents"])
        return now

    def spent(self) -> dict[str, float]:
        now = self._now()
        return {name: now[name] - self.began[name] for name in now}


def fanout_once(argv: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Wall time of the whole CLI, the slowest instance's session, the summary's tally."""
    began = time.perf_counter()
    result = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, env=env,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=600)
    elapsed = time.perf_counter() - began
    lines = result.stderr.decode().strip().splitlines()
    if result.returncode != 0:
        raise RuntimeError(f"{argv[-3]}: exit {result.returncode}: {lines[-1:]}")
    slowest = max(float(line.split()[3].rstrip("s")) for line in lines if "-instance-" in line)
    return elapsed, slowest, lines[-1]


def measure_size(stack: Stack, argv: list[str], runs: int, warmup: int,
                 env: dict | None = None, fleet: list[subprocess.Popen] | None = None) -> dict:
    """RUNS fan-outs of ARGV: wall times, slowest session, apiserver RSS before and at peak,
    CPU seconds per part of the stack over the timed runs."""
    for _ in range(warmup):
        fanout_once(argv, env)
    api_pid = stack.procs["apiserver"].pid
    before = rss_kib(api_pid)
    mux_dir = (env or {}).get("RUNE_MUX_DIR")
    meter = CpuMeter(stack, fleet or [], mux_pid(mux_dir) if mux_dir else None)
    sampler = RssSampler(api_pid)
    sampler.start()
    times, slowest, tally = [], 0.0, ""
    try:
        for _ in range(runs):
            elapsed, slow, tally = fanout_once(argv, env)
            times.append(elapsed)
            slowest = max(slowest, slow)
    finally:
        peak = sampler.stop()
    return {"times": times, "slowest_s": slowest, "tally": tally, "rss_before_kib": before,
            "rss_peak_kib": peak, "cpu_s": meter.spent()}


def run(ctx: BenchContext) -> list[dict]:
    out = []
    script = installed_rune(ctx.workdir)

    def rune(*args: str) -> list[str]:
        return [str(script), "exec", "--api-server", ctx.api_address, *args]

    for size in ctx.sizes.fanout:
        name = f"rune fan-out to {size} instances (whole CLI process, wheel install)"
        try:
            out.extend(_size_rows(ctx, size, name, rune))
        except Exception as exc:
            out.append(rows.absent(f"fanout.{size}", SECTION, name, rows.ERROR,
                                   f"{type(exc).__name__}: {exc}"))
    whole = {r["instances"]: r["value"] for r in out
             if r["id"].endswith(".per_instance") and r["value"] is not None}
    flat = _flatness(whole, "fanout.per_instance_spread", "the cost per instance")
    if flat is not None:
        out.append(flat)
        # The same without what a run costs whatever its size (the CLI, its first session):
        # (T(n) - T(one exec)) / n, one `rune exec api true` timed here in the same fleet.
        single = statistics.median(timed_run(rune(ctx.target, "true"), ctx.env)
                                   for _ in range(ctx.sizes.fanout_runs)) * 1000
        marginal = {n: (ms * n - single) / n for n, ms in whole.items()}
        out.append(_flatness(marginal, "fanout.marginal_spread",
                             f"the marginal cost per instance ((T(n) - T(1)) / n, T(1) = "
                             f"{single:.1f} ms)"))
    return out


def _flatness(costs: dict[int, float], row_id: str, what: str) -> dict | None:
    """The spread of a cost per instance over the sizes from 100 up (goal: within 20 %)."""
    costs = {n: ms for n, ms in costs.items() if n >= 100}
    if len(costs) < 2:
        return None
    low, high = min(costs.values()), max(costs.values())
    # The row's figure is high / low - 1; `within_pct` is the same spread read as a band,
    # every size within +-that much of the middle of the highest and lowest.
    return rows.figure(row_id, SECTION, f"spread of {what}, {min(costs)} to {max(costs)}",
                       (high / low - 1) * 100, "%",
                       within_pct=round((high - low) / (high + low) * 100, 1),
                       per_instance_ms={n: round(ms, 3) for n, ms in costs.items()})


def _size_rows(ctx: BenchContext, size: int, name: str,
               rune: Callable[..., list[str]]) -> list[dict]:
    agents, replicas = shape(size)
    service = f"fanout{size}"
    procs = start_fleet(ctx.stack, agents, replicas, service=service, id_prefix=f"f{size}x",
                        timeout=300, processes=max(1, agents // 5))
    # ctx.env names the bench's own multiplexer; it need not outlive the fleets for long.
    env = {"RUNE_MUX_IDLE": "60", **ctx.env}
    try:
        got = measure_size(ctx.stack, rune(service, "--all", "true"),
                           ctx.sizes.fanout_runs, ctx.sizes.warmup, env, procs)
    finally:
        _stop_fleet(ctx.stack, procs)
    timing = rows.latency(f"fanout.{size}", SECTION, name, got["times"], ref=SINGLE)
    rss = rows.figure(f"fanout.{size}.rss", SECTION,
                      f"apiserver RSS peak during fan-out to {size}",
                      got["rss_peak_kib"] / 1024, "MiB",
                      rss_before_mib=got["rss_before_kib"] / 1024)
    per = rows.figure(f"fanout.{size}.per_instance", SECTION,
                      f"cost per instance, fan-out to {size} over {agents} agents",
                      timing["value"] / size, "ms", instances=size, agents=agents)
    members = size * len(got["times"])
    cpu = [rows.figure(f"fanout.{size}.cpu.{part.replace(chr(39), '').replace(' ', '_')}",
                       SECTION,
                       f"CPU per instance, fan-out to {size}: {part}",
                       spent * 1000 / members, "ms")
           for part, spent in got["cpu_s"].items()]
    return [timing | {"versus": "one `rune exec api true` (wheel install)", "agents": agents,
                      "slowest_session_s": got["slowest_s"], "tally": got["tally"]}, per,
            *cpu, rss]


def _stop_fleet(stack: Stack, procs: list[subprocess.Popen]) -> None:
    """Stops a size's agents so they weigh on no later measurement."""
    for name, proc in list(stack.procs.items()):
        if proc in procs:
            stop_pid(proc.pid, 30.0, proc)
            del stack.procs[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=Sizes.fanout_runs)
    parser.add_argument("--warmup", type=int, default=Sizes.warmup)
    parser.add_argument("--sizes", default=",".join(map(str, Sizes.fanout)))
    args = parser.parse_args()
    from bench.harness import standalone

    sizes = tuple(int(s) for s in args.sizes.split(","))
    standalone(run, dataclasses.replace(Sizes(), fanout=sizes, fanout_runs=args.runs,
                                        warmup=args.warmup))


if __name__ == "__main__":
    main()
