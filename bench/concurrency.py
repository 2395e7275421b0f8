"""Section 5: many idle interactive sessions held open: memory per session, new-session latency."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from rune.cli.client import ApiClient, ExecOptions, ExecStream, run_command

from bench import aio, rows
from bench.context import BenchContext

SECTION = "5. idle sessions held open"
STREAMS_PER_CHANNEL = 100  # keeps each HTTP/2 connection under common stream limits
OPEN_PARALLEL = 16
IDLE = "sessions.0.setup"
CLOSE_WAIT = 30.0


def rss_kib(pid: int) -> int:
    """Resident set size of PID in KiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run(ctx: BenchContext) -> list[dict]:
    try:
        return aio.run(_run(ctx))
    except Exception as exc:
        return [rows.absent("sessions.error", SECTION, "idle sessions", rows.ERROR,
                            f"{type(exc).__name__}: {exc}")]


async def _run(ctx: BenchContext) -> list[dict]:
    pids = {"apiserver": ctx.pid("apiserver"), "agent": ctx.pid(f"agent-{ctx.agent_id}")}
    held: list[ExecStream] = []
    clients: list[ApiClient] = []
    idle = await _idle_client_samples(ctx)  # also warms the session path up
    out = [rows.latency(IDLE, SECTION, "new session setup (API) with 0 open", idle)]
    base = {name: rss_kib(pid) for name, pid in pids.items()}
    try:
        for level in ctx.sizes.sessions:
            await _open_up_to(ctx, level, held, clients)
            for name, pid in pids.items():
                per = (rss_kib(pid) - base[name]) / level
                out.append(rows.figure(f"sessions.{level}.rss.{name}", SECTION,
                                       f"{name} RSS per session, {level} open", per, "KiB",
                                       sessions=level, rss_base_kib=base[name]))
            samples = await _setup_samples(ctx, clients[0], ctx.sizes.loaded_setup_n)
            out.append(rows.latency(f"sessions.{level}.setup", SECTION,
                                    f"new session setup (API) with {level} open", samples,
                                    ref=IDLE) | {"versus_idle": True})
    finally:
        await _close(held, clients)
    return out


async def _open_up_to(ctx: BenchContext, level: int, held: list[ExecStream],
                      clients: list[ApiClient]) -> None:
    """Opens `cat` sessions with a remote TTY (never sending EOF) until LEVEL are open."""
    options = ExecOptions(target=ctx.target, command=["cat"], tty=True, width=80, height=24,
                          timeout=3600)
    gate = asyncio.Semaphore(OPEN_PARALLEL)

    async def open_one(client: ApiClient) -> ExecStream:
        async with gate:
            stream = client.exec_stream()
            held.append(stream)  # closed at the end even when it fails to start
            await stream.start(options)
            return stream

    pending = []
    for index in range(len(held), level):
        if index // STREAMS_PER_CHANNEL >= len(clients):
            clients.append(ApiClient(ctx.api_address))
        pending.append(open_one(clients[index // STREAMS_PER_CHANNEL]))
    results = await asyncio.gather(*pending, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(results)} sessions failed to open: "
                           f"{failures[0]}")


async def _idle_client_samples(ctx: BenchContext) -> list[float]:
    async with ApiClient(ctx.api_address) as client:
        await _setup_samples(ctx, client, ctx.sizes.warmup)
        return await _setup_samples(ctx, client, ctx.sizes.loaded_setup_n)


async def _setup_samples(ctx: BenchContext, client: ApiClient, n: int) -> list[float]:
    options = ExecOptions(target=ctx.target, command=["true"], timeout=60)
    samples = []
    for _ in range(n):
        began = time.perf_counter()
        result = await run_command(client, options)
        samples.append(time.perf_counter() - began)
        if result.code != 0:
            raise RuntimeError(f"`true` exited {result.code} with sessions open")
    return samples


async def _close(held: list[ExecStream], clients: list[ApiClient]) -> None:
    """Cancels every call and waits until each has ended, then closes the channels: a call
    still ending when its loop closes would print 'Event loop is closed' (see bench/aio.py)."""
    for stream in held:
        stream.cancel()
    ended = asyncio.gather(*(stream.call.code() for stream in held), return_exceptions=True)
    try:
        await asyncio.wait_for(ended, CLOSE_WAIT)
    except TimeoutError:
        pass
    for client in clients:
        await client.close()
