"""`rune exec` into a container vs plain `docker exec` on the same container, in one run.

    python bench/docker_vs_rune.py [--runs 200] [--size-mib 1024] [--tty]

An agent with the Docker runner adopts the bench's labelled busybox container; the two
tools then take turns: setup (`true`, whole client process, wall clock) and stdout
throughput (`head -c SIZE /dev/zero`, every byte counted by the bench).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/docker_vs_rune.py`: the repo root holds bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rune.cli.devstack import Stack, stop_pid  # noqa: E402

from bench import rows  # noqa: E402
from bench.context import BenchContext, Sizes  # noqa: E402
from bench.dockerbox import SERVICE, DockerBox  # noqa: E402
from bench.procs import drain, timed_run  # noqa: E402

SECTION = "extra: rune into Docker containers vs docker exec"
AGENT = "bench-docker"
TTY = "docker_tty"  # ctx.extra key: also measure throughput with a remote TTY


def adopt(stack: Stack, box: DockerBox) -> None:
    """Starts an agent whose Docker runner owns just BOX's container; waits until it runs."""
    stack.start_agent(AGENT, [], {"docker": {"enabled": True,
                                             "match_labels": {"rune.bench": box.name}}},
                      wait_running=1)


def release(stack: Stack) -> None:
    """Stops that agent (an adopted container outlives it)."""
    proc = stack.procs.pop(f"agent-{AGENT}", None)
    if proc is not None:
        stop_pid(proc.pid, 10.0, proc)


def setup_times(rune: list[str], docker: list[str], n: int, warmup: int,
                env: dict) -> tuple[list[float], list[float]]:
    """`true` through each tool, taking turns so that load drifts hit both alike."""
    for _ in range(warmup):
        timed_run(rune, env)
        timed_run(docker)
    rune_s, docker_s = [], []
    for _ in range(n):
        rune_s.append(timed_run(rune, env))
        docker_s.append(timed_run(docker))
    return rune_s, docker_s


def run(ctx: BenchContext) -> list[dict]:
    if not ctx.docker:
        return [rows.absent(row_id, SECTION, name, rows.SKIPPED, ctx.docker_reason)
                for row_id, name in (("docker.setup.rune", "rune exec into a container"),
                                     ("docker.setup.docker", "docker exec"))]
    adopt(ctx.stack, ctx.docker)
    try:
        return _measure(ctx)
    finally:
        release(ctx.stack)


def _measure(ctx: BenchContext) -> list[dict]:
    rune_s, docker_s = setup_times(ctx.rune_argv(SERVICE, "true"), ctx.docker.argv("true"),
                                   ctx.sizes.cli_n, ctx.sizes.warmup, ctx.env)
    out = [rows.latency("docker.setup.rune", SECTION,
                        f"`rune exec {SERVICE} true` into a container (whole CLI process)",
                        rune_s),
           rows.latency("docker.setup.docker", SECTION, "`docker exec CONTAINER true`, same "
                        "container", docker_s, ref="docker.setup.rune")]
    size = ctx.sizes.stream_bytes
    produce = ["head", "-c", str(size), "/dev/zero"]
    for tty in (False, True) if ctx.extra.get(TTY) else (False,):
        mode = "tty" if tty else "nontty"
        flag = ["--tty" if tty else "--no-tty"]
        label = f"{size >> 20} MiB{' (TTY)' if tty else ''}"
        rune_id = f"docker.stream.{mode}.rune"
        elapsed = drain(ctx.rune_argv(*flag, SERVICE, *produce), size, ctx.env)
        out.append(rows.throughput(rune_id, SECTION,
                                   f"rune exec {flag[0]} into a container, {label}", size,
                                   elapsed))
        elapsed = drain(ctx.docker.argv(*produce, tty=tty), size)
        out.append(rows.throughput(f"docker.stream.{mode}.docker", SECTION,
                                   f"docker exec{' -t' if tty else ''}, same container, {label}",
                                   size, elapsed, ref=rune_id))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=Sizes.cli_n)
    parser.add_argument("--size-mib", type=int, default=Sizes.stream_bytes >> 20)
    parser.add_argument("--tty", action="store_true", help="also measure with a remote TTY")
    args = parser.parse_args()
    from bench.harness import standalone

    sizes = dataclasses.replace(Sizes(), cli_n=args.runs, stream_bytes=args.size_mib << 20)

    def with_tty(ctx: BenchContext) -> list[dict]:
        ctx.extra[TTY] = args.tty
        return run(ctx)

    standalone(with_tty, sizes)


if __name__ == "__main__":
    main()
