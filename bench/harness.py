"""Starts and stops what the bench measures: the stack, a throwaway sshd, a container."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rune.cli import muxwire
from rune.cli.devstack import Stack, free_port

from bench import aio, report, rows
from bench.context import BenchContext, Sizes
from bench.dockerbox import DockerBox, DockerUnavailable
from bench.producer import ProducerUnavailable, build
from bench.sshd import Sshd, SshdUnavailable

AGENT_ID = "bench"
SERVICES = [{"name": "api", "namespace": "default", "replicas": 1,
             "command": ["sh", "-c", "exec sleep 2147483647"]}]


@contextmanager
def bench_context(sizes: Sizes, quick: bool, keep: bool = False) -> Iterator[BenchContext]:
    """nats-server, apiserver and agent on free loopback ports, plus the baselines' servers."""
    workdir = Path(tempfile.mkdtemp(prefix="rune-bench-"))
    stack = Stack(workdir / "stack", nats_port=free_port(), api_port=free_port())
    ctx = BenchContext(stack=stack, workdir=workdir, quick=quick, sizes=sizes,
                       agent_id=AGENT_ID)
    try:
        print(f"bench: starting nats-server, rune-apiserver, rune-agent in {workdir}",
              file=sys.stderr, flush=True)
        stack.start_nats()
        cap = max(sizes.sessions) + 100  # the idle-session rows hold this many open
        stack.start_apiserver({"limits": {"max_sessions_per_agent": cap}})
        _start_baselines(ctx)
        extra: dict = {"max_sessions": cap}
        if ctx.docker:  # the agent also owns the baseline's container: rune's container target
            extra["docker"] = {"enabled": True, "match_labels": {"rune.bench": ctx.docker.name}}
        stack.start_agent(AGENT_ID, SERVICES, extra,
                          wait_running=len(SERVICES) + (1 if ctx.docker else 0))
        yield ctx
    finally:
        _stop_baselines(ctx)
        if ctx.mux_dir.is_dir():
            muxwire.request(str(ctx.mux_dir), {"t": "stop"})
        stack.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def standalone(run: Callable[[BenchContext], object], sizes: Sizes) -> None:
    """One section's run(ctx) on its own (`python bench/<name>.py`): prints its table."""
    began = time.monotonic()
    with bench_context(sizes, quick=False) as ctx:
        result = run(ctx)
        if inspect.isawaitable(result):
            result = aio.run(result)
    rows.attach_ratios(result)
    print(report.markdown(result, report.meta_for(False, time.monotonic() - began)))


def _start_baselines(ctx: BenchContext) -> None:
    try:
        ctx.producer = build(ctx.workdir)
    except (ProducerUnavailable, OSError, subprocess.SubprocessError) as exc:
        ctx.producer_reason = str(exc)
    sshd = Sshd(ctx.workdir)
    try:
        sshd.start()
        ctx.sshd = sshd
    except SshdUnavailable as exc:
        ctx.sshd_reason = str(exc)
    docker = DockerBox()
    try:
        docker.start()
        if ctx.producer:
            docker.install(ctx.producer)
        ctx.docker = docker
    except (DockerUnavailable, OSError) as exc:
        docker.stop()
        ctx.docker_reason = str(exc)


def _stop_baselines(ctx: BenchContext) -> None:
    if ctx.docker:
        ctx.docker.stop()
    if ctx.sshd:
        ctx.sshd.stop()
