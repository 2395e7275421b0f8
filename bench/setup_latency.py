"""Section 1: setup latency of `true`, rune (CLI process and client API) beside its baselines."""

from __future__ import annotations

import time

import nats
from rune.cli.client import ApiClient, ExecOptions, run_command

from bench import aio, rows
from bench.context import BenchContext
from bench.procs import timed_runs

SECTION = "1. setup latency of `true`"
FLOOR_SUBJECT = "bench.floor"  # a bench-only subject: no rune message ever uses it
CLI, API = "setup.rune_cli", "setup.rune_api"


def run(ctx: BenchContext) -> list[dict]:
    n, warmup = ctx.sizes.setup_n, ctx.sizes.warmup
    out = [_guard(CLI, "`rune exec api true` (whole CLI process)", lambda: rows.latency(
        CLI, SECTION, "`rune exec api true` (whole CLI process)",
        timed_runs(ctx.rune_argv(ctx.target, "true"), ctx.sizes.cli_n, warmup, ctx.env)))]
    out.append(_guard(API, "rune client API round trip (in-process)", lambda: rows.latency(
        API, SECTION, "rune client API round trip (in-process)",
        aio.run(api_round_trips(ctx.api_address, ctx.target, n, warmup)))))
    if ctx.sshd:
        out.append(_guard("setup.ssh", "`ssh localhost true`", lambda: rows.latency(
            "setup.ssh", SECTION, "`ssh localhost true`",
            timed_runs(ctx.sshd.argv("true"), n, warmup), ref=CLI)))
    else:
        out.append(rows.absent("setup.ssh", SECTION, "`ssh localhost true`", rows.SKIPPED,
                               ctx.sshd_reason))
    if ctx.docker:
        out.append(_guard("setup.docker", "`docker exec CONTAINER true`", lambda: rows.latency(
            "setup.docker", SECTION, "`docker exec CONTAINER true`",
            timed_runs(ctx.docker.argv("true"), n, warmup), ref=CLI)))
    else:
        out.append(rows.absent("setup.docker", SECTION, "`docker exec CONTAINER true`",
                               rows.SKIPPED, ctx.docker_reason))
    out.append(_guard("setup.nats", "bare NATS request/reply (the floor)", lambda: rows.latency(
        "setup.nats", SECTION, "bare NATS request/reply (the floor)",
        aio.run(nats_round_trips(ctx.stack.nats_url, n, warmup)), ref=API) | {"floor": True}))
    return out



def _guard(row_id: str, name: str, measure: object) -> dict:
    return rows.guarded(row_id, SECTION, name, measure)


async def api_round_trips(address: str, target: str, n: int, warmup: int) -> list[float]:
    """`true` through ApiClient + run_command on one warm channel, as a program would."""
    options = ExecOptions(target=target, command=["true"], timeout=60)
    samples = []
    async with ApiClient(address) as client:
        for i in range(warmup + n):
            began = time.perf_counter()
            result = await run_command(client, options)
            elapsed = time.perf_counter() - began
            if result.code != 0:
                raise RuntimeError(f"`true` exited {result.code}: {result.stderr[-200:]!r}")
            if i >= warmup:
                samples.append(elapsed)
    return samples


async def nats_round_trips(url: str, n: int, warmup: int) -> list[float]:
    """An empty request answered by a second connection: what any NATS hop costs."""
    responder = await nats.connect(url)
    requester = await nats.connect(url)
    try:
        async def answer(msg: object) -> None:
            await msg.respond(b"")

        await responder.subscribe(FLOOR_SUBJECT, cb=answer)
        await responder.flush()
        samples = []
        for i in range(warmup + n):
            began = time.perf_counter()
            await requester.request(FLOOR_SUBJECT, b"", timeout=5)
            if i >= warmup:
                samples.append(time.perf_counter() - began)
        return samples
    finally:
        await requester.close()
        await responder.close()
