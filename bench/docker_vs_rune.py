"""`rune exec` into a container beside `rune exec` into a process and plain `docker exec`.

    python bench/docker_vs_rune.py [--runs 200] [--streams] [--size-mib 1024]

The bench's agent owns both a process instance (`api`) and the bench's labelled busybox
container (`dockerbox`). The three take turns at `true` (whole client process, wall
clock), so that load drifts hit all alike: what a container costs over a process, and
rune against `docker exec` on the very same container. With --streams it also runs the
container rows of section 2 (rune and `docker exec`, the same static producer).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":  # `python bench/docker_vs_rune.py`: the repo root holds bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rune.agent.runners.parked import parked_pids  # noqa: E402

from bench import rows  # noqa: E402
from bench.context import BenchContext, Sizes  # noqa: E402
from bench.dockerbox import SERVICE  # noqa: E402
from bench.procs import timed_run  # noqa: E402

SECTION = "extra: rune into Docker containers vs docker exec"
STREAMS = "docker_streams"  # ctx.extra key: also the container rows of section 2
CONTAINER, PROCESS, DOCKER = "docker.setup.rune", "docker.setup.rune_process", \
    "docker.setup.docker"
PARKED = "docker.setup.parked"


def take_turns(argvs: list[list[str]], envs: list[dict | None], n: int, warmup: int,
               settle: dict[int, Callable[[], float]] | None = None
               ) -> tuple[list[list[float]], dict[int, list[float]]]:
    """Each command once per round, N rounds, so that load drifts hit every one alike.
    settle[i], untimed, runs after command i until what it left running in the background
    is done (so the next command does not pay for it); the seconds each settle took."""
    settle = settle or {}
    for _ in range(warmup):
        for i, (argv, env) in enumerate(zip(argvs, envs, strict=True)):
            timed_run(argv, env)
            if i in settle:
                settle[i]()
    samples: list[list[float]] = [[] for _ in argvs]
    settled: dict[int, list[float]] = {i: [] for i in settle}
    for _ in range(n):
        for i, (argv, env) in enumerate(zip(argvs, envs, strict=True)):
            samples[i].append(timed_run(argv, env))
            if i in settle:
                settled[i].append(settle[i]())
    return samples, settled


def wait_parked(limit: float = 2.0) -> float:
    """Seconds until a start is parked again after an exec took the last one (at most
    limit: none comes where the agent parks nothing)."""
    began = time.perf_counter()
    while not parked_pids() and time.perf_counter() - began < limit:
        time.sleep(0.001)
    return time.perf_counter() - began


def run(ctx: BenchContext) -> list[dict]:
    if not ctx.docker:
        return [rows.absent(row_id, SECTION, name, rows.SKIPPED, ctx.docker_reason)
                for row_id, name in ((CONTAINER, "rune exec into a container"),
                                     (DOCKER, "docker exec"))]
    setup = rows.guarded(CONTAINER, SECTION, "setup of `true`", lambda: _setup(ctx))
    out = setup if isinstance(setup, list) else [setup]  # one error row when it failed
    if ctx.extra.get(STREAMS):
        from bench import throughput

        size = ctx.sizes.stream_bytes
        for tty in (False, True):
            pair = [c for c in throughput._contenders(ctx, tty, size,
                                                      throughput._size_label(size))
                    if c[0].endswith((".rune_container", ".docker"))]
            for (row_id, name, _, reason, ref), runs in zip(
                    pair, throughput.take_turns(pair, ctx.sizes.stream_rounds), strict=True):
                out.append(throughput._row(row_id, name, runs, reason, size, ref))
    return out


def _setup(ctx: BenchContext) -> list[dict]:
    (container, process, docker), settled = take_turns(
        [ctx.rune_argv(SERVICE, "true"), ctx.rune_argv(ctx.target, "true"),
         ctx.docker.argv("true")],
        [ctx.env, ctx.env, None], ctx.sizes.cli_n, ctx.sizes.warmup, {0: wait_parked})
    parked = max(settled[0]) < 2.0
    return [
        rows.latency(CONTAINER, SECTION, f"`rune exec {SERVICE} true` into a container "
                     "(whole CLI process)" + (", taking the parked start" if parked else
                                              ", nothing parked: runc each time"),
                     container, ref=PROCESS)
        | {"versus": "the time into a process instance"},
        rows.latency(PROCESS, SECTION, f"`rune exec {ctx.target} true` into a process "
                     "instance, same turns (whole CLI process)", process),
        rows.latency(DOCKER, SECTION, "`docker exec CONTAINER true`, same container, "
                     "same turns", docker, ref=CONTAINER),
        rows.latency(PARKED, SECTION, "after each container exec: until the agent has the "
                     "next start parked, in the background (untimed above, waited for "
                     "before the next turn)", settled[0]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=Sizes.cli_n)
    parser.add_argument("--size-mib", type=int, default=Sizes.stream_bytes >> 20)
    parser.add_argument("--streams", action="store_true",
                        help="also stream SIZE through rune and docker exec, TTY and not")
    args = parser.parse_args()
    from bench.harness import standalone

    sizes = dataclasses.replace(Sizes(), cli_n=args.runs, stream_bytes=args.size_mib << 20)

    def with_streams(ctx: BenchContext) -> list[dict]:
        ctx.extra[STREAMS] = args.streams
        return run(ctx)

    standalone(with_streams, sizes)


if __name__ == "__main__":
    main()
