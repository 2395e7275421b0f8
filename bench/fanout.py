"""Times `rune exec SERVICE --all true` at 10, 100 and 500 instances; apiserver RSS too.

    python -m bench.fanout [--runs 3]

Starts its own nats-server, apiserver and fleets of agents (several per process, each
its own NATS client) on free loopback ports; prints one row per size.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cli.devstack import Stack, free_port
from tests.multi_agent import start_fleet

ROOT = Path(__file__).resolve().parent.parent

SIZES = {10: (2, 5), 100: (10, 10), 500: (25, 20)}  # instances: (agents, replicas)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in open(f"/proc/{pid}/status"):
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


def fanout_once(stack: Stack, service: str) -> tuple[float, float, str]:
    """Wall time of the whole CLI, the slowest instance's session, the summary's tally."""
    argv = [sys.executable, "-m", "cli.main", "exec", "--api-server", stack.api_address,
            service, "--all", "true"]
    began = time.perf_counter()
    result = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=600)
    elapsed = time.perf_counter() - began
    lines = result.stderr.decode().strip().splitlines()
    if result.returncode != 0:
        raise SystemExit(f"{service}: exit {result.returncode}: {lines[-1]}")
    slowest = max(float(line.split()[3].rstrip("s")) for line in lines
                  if "-instance-" in line)
    return elapsed, slowest, lines[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    stack = Stack(tempfile.mkdtemp(prefix="rune-fanout-bench-"), nats_port=free_port(),
                  api_port=free_port())
    try:
        stack.start_nats()
        stack.start_apiserver()
        for size, (agents, replicas) in SIZES.items():
            start_fleet(stack, agents, replicas, service=f"f{size}", id_prefix=f"s{size}x",
                        timeout=300, processes=max(1, agents // 5))
        api_pid = stack.procs["apiserver"].pid
        print(f"{'instances':>9}  {'agents':>6}  {'median':>8}  {'best':>8}  "
              f"{'slowest session':>15}  {'apiserver RSS before/peak':>26}  result")
        for size, (agents, _) in SIZES.items():
            fanout_once(stack, f"f{size}")  # warm-up: imports, connections
            before = rss_kib(api_pid)
            sampler = RssSampler(api_pid)
            sampler.start()
            times, slowest, last = [], 0.0, ""
            for _ in range(args.runs):
                elapsed, slow, last = fanout_once(stack, f"f{size}")
                times.append(elapsed)
                slowest = max(slowest, slow)
            peak = sampler.stop()
            print(f"{size:>9}  {agents:>6}  {statistics.median(times):>7.3f}s  "
                  f"{min(times):>7.3f}s  {slowest:>14.2f}s  "
                  f"{before / 1024:>11.1f} / {peak / 1024:.1f} MiB      {last}", flush=True)
    finally:
        stack.stop(timeout=30)
        shutil.rmtree(stack.state_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
