"""Section 2: stdout throughput of a big stream, non-TTY and TTY, rune beside its baselines.

Every contender runs the same static producer (bench/producer.c): rune into a process
instance, ssh and the local pipe run it on the host; rune into the container and
`docker exec` run the copy inside the bench's container. Each rune row is the reference of
the baseline doing the same work: ssh and the local floor against rune into a process,
`docker exec` against rune into the container. The contenders of a mode take turns,
`stream_rounds` rounds (3; --quick 1), and each row gives its median run, so that a drift
in the machine's load hits all alike.

    python bench/throughput.py [--size-mib 256] [--rounds 3]   (this section alone, bounded)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":  # `python bench/throughput.py`: the repo root holds bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import rows  # noqa: E402
from bench.context import BenchContext  # noqa: E402
from bench.dockerbox import SERVICE  # noqa: E402
from bench.procs import drain, drain_local_pty  # noqa: E402
from bench.producer import HOST_HEAD  # noqa: E402

SECTION = "2. stdout throughput"
Contender = tuple[str, str, Callable[[], float] | None, str | None, str | None]


def run(ctx: BenchContext) -> list[dict]:
    size = ctx.sizes.stream_bytes
    label = _size_label(size)
    out: list[dict] = []
    for tty in (False, True):
        contenders = _contenders(ctx, tty, size, label)
        for (row_id, name, _, reason, ref), runs in zip(
                contenders, take_turns(contenders, ctx.sizes.stream_rounds), strict=True):
            row = _row(row_id, name, runs, reason, size, ref)
            out.append(row | {"floor": True} if row_id.endswith(".local") else row)
    return out


def take_turns(contenders: list[Contender], rounds: int) -> list[list[float] | Exception | None]:
    """Each contender once a round, so that a drift in the machine's load hits all alike:
    the seconds of every run, or the first failure."""
    results: list[list[float] | Exception | None] = [
        [] if measure is not None else None for _, _, measure, _, _ in contenders]
    for _ in range(rounds):
        for i, (_, _, measure, _, _) in enumerate(contenders):
            if not isinstance(results[i], list):
                continue
            try:
                results[i].append(measure())
            except Exception as exc:  # that contender's row says why; the others go on
                results[i] = exc
    return results


def _contenders(ctx: BenchContext, tty: bool, size: int, label: str) -> list[Contender]:
    mode = "TTY" if tty else "non-TTY"
    prefix = f"stream.{mode.lower().replace('-', '')}"
    flag = "--tty" if tty else "--no-tty"
    producer = ctx.producer or HOST_HEAD
    in_container = ctx.docker if ctx.producer else None
    container_reason = ctx.docker_reason if ctx.producer else \
        f"no static producer for the container: {ctx.producer_reason}"
    made_by = f"{label} ({mode}), {producer.name}"
    host, inside = producer.argv(size), producer.container_argv(size)
    rune_id, container_id = f"{prefix}.rune", f"{prefix}.rune_container"
    log = ctx.workdir / "rune-cli.log"
    return [
        (rune_id, f"rune exec {flag} into a process instance, {made_by} on the host",
         lambda: drain(ctx.rune_argv(flag, ctx.target, *host), size, ctx.env, log=log),
         None, None),
        (container_id, f"rune exec {flag} into a container, {made_by} in the container",
         (lambda: drain(ctx.rune_argv(flag, SERVICE, *inside), size, ctx.env, log=log))
         if in_container else None, container_reason, None),
        (f"{prefix}.docker", f"docker exec{' -t' if tty else ''}, same container, {made_by} "
         "in the container",
         (lambda: drain(ctx.docker.argv(*inside, tty=tty), size)) if in_container else None,
         container_reason, container_id),
        (f"{prefix}.ssh", f"ssh{' -tt' if tty else ''} localhost, {made_by} on the host",
         (lambda: drain(ctx.sshd.argv(*host, tty=tty), size)) if ctx.sshd else None,
         ctx.sshd_reason, rune_id),
        (f"{prefix}.local", f"local {'PTY' if tty else 'pipe'}, {made_by}",
         (lambda: drain_local_pty(host, size)) if tty else (lambda: drain(host, size)),
         None, rune_id),
    ]


def _row(row_id: str, name: str, runs: list[float] | Exception | None, reason: str | None,
         size: int, ref: str | None) -> dict:
    if runs is None:
        return rows.absent(row_id, SECTION, name, rows.SKIPPED, reason or "unavailable")
    if isinstance(runs, Exception):
        return rows.absent(row_id, SECTION, name, rows.ERROR, f"{type(runs).__name__}: {runs}")
    return rows.throughput(row_id, SECTION, name, size, runs, ref=ref)


def _size_label(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"


def main() -> None:
    from bench.context import Sizes
    from bench.harness import standalone

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="bytes each row streams")
    parser.add_argument("--rounds", type=int, default=Sizes.stream_rounds,
                        help="runs of each row, taking turns (the median is reported)")
    args = parser.parse_args()
    standalone(run, Sizes(stream_bytes=args.size_mib << 20, stream_rounds=args.rounds))


if __name__ == "__main__":
    main()
