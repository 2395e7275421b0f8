"""`rune exec --all / --instances / --selector`: one command on many instances, one stream."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from rune.cli.client import ApiClient
from rune.cli.common import Connection, Job, checked_flags, connect, current, fail, namespace_of
from rune.cli.fanout_output import (
    GroupWriter,
    InstanceResult,
    JsonWriter,
    LineWriter,
    Progress,
    overall_exit,
    summary,
)
from rune.cli.invocation import Invocation
from rune.cli.parsing import parse_duration

from rune.errors import RuneError, Unavailable
from rune.proto import exec_pb2 as pb
from rune.rollout import NEVER_RAN, Amount


@dataclass
class FanoutOptions:
    target: str
    command: list[str]
    namespace: str = "default"
    all: bool = False
    instances: list[str] = field(default_factory=list)
    selector: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    timeout: float = 300.0
    max_parallel: int = 256
    fail_fast: bool = False
    batch: str = ""
    batch_wait: float = 0.0
    max_fail: str = ""
    canary: int = 0
    job_timeout: float = 0.0

    def request(self) -> pb.FanoutRequest:
        return pb.FanoutRequest(
            namespace=self.namespace, target=self.target, all=self.all,
            instances=self.instances, selector=self.selector, command=self.command,
            env=self.env, workdir=self.workdir, timeout_seconds=self.timeout,
            max_parallel=self.max_parallel, fail_fast=self.fail_fast, batch=self.batch,
            batch_wait_seconds=self.batch_wait, max_fail=self.max_fail, canary=self.canary,
            job_timeout_seconds=self.job_timeout, batched=True)


@dataclass
class RolloutFlags:
    """--batch, --batch-wait, --max-fail, --canary, --job-timeout as given."""

    batch: str = ""
    batch_wait: str = ""
    max_fail: str = ""
    canary: int = 0
    job_timeout: str = ""

    @property
    def given(self) -> bool:
        return bool(self.batch or self.batch_wait or self.max_fail or self.canary
                    or self.job_timeout)

    def checked(self) -> dict[str, object]:
        """The request's rollout terms; a bad flag is a usage error (exit 2)."""
        terms: dict[str, object] = {"canary": self.canary}
        for flag, text, zero_ok in (("--batch", self.batch, False),
                                    ("--max-fail", self.max_fail, True)):
            try:
                Amount.parse(text, flag, zero_ok=zero_ok)
            except RuneError as exc:
                raise fail(exc.message, 2) from None
            terms[flag[2:].replace("-", "_")] = text.strip()
        for flag, text in (("--batch-wait", self.batch_wait), ("--job-timeout",
                                                               self.job_timeout)):
            try:
                terms[flag[2:].replace("-", "_")] = parse_duration(text) if text else 0.0
            except ValueError as exc:
                raise fail(f"{flag}: {exc}", 2) from None
        return terms


def parse_selector(items: list[str]) -> dict[str, str]:
    """`k=v` items, each possibly `k=v,k2=v2` (as kubectl -l); raises ValueError."""
    selector: dict[str, str] = {}
    for item in items:
        for pair in filter(None, item.split(",")):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"invalid --selector {pair!r}: expected KEY=VALUE")
            selector[key.strip()] = value.strip()
    return selector


def parse_instances(items: list[str]) -> list[str]:
    """`a,b,c` (repeatable) → ids in order, without duplicates; raises ValueError on none."""
    ids = [i.strip() for item in items for i in item.split(",") if i.strip()]
    if items and not ids:
        raise ValueError("--instances needs at least one instance id")
    return list(dict.fromkeys(ids))


STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class FanoutCommand:
    def __init__(self, client: ApiClient, options: FanoutOptions, json_output: bool = False,
                 prefix: bool = True, out: BinaryIO | None = None, err: BinaryIO | None = None,
                 err_text: TextIO | None = None, env: Mapping[str, str] | None = None,
                 group: bool = False) -> None:
        self.env = os.environ if env is None else env
        self.group = group
        self.client = client
        self.options = options
        self.json_output = json_output
        self.prefix = prefix
        self.out = out or sys.stdout.buffer
        self.err = err or sys.stderr.buffer
        self.err_text = err_text or sys.stderr
        self.results: dict[str, InstanceResult] = {}

    def _colour(self, stream: BinaryIO) -> bool:
        return not self.env.get("NO_COLOR") and _isatty(stream)

    async def run(self) -> int:
        writer = None
        progress = Progress(self.err_text, 0, enabled=False)
        ticker: asyncio.Task | None = None
        try:
            async for response in _unbatched(self.client.stream_fanout(
                    self.options.request())):
                kind = response.WhichOneof("msg")
                instance = response.instance_id
                if kind == "plan":
                    writer, progress = self._plan(response.plan)
                    ticker = asyncio.create_task(_tick(progress))
                    continue
                if writer is None:
                    raise Unavailable("the API server sent output before its plan")
                result = self.results.setdefault(instance, InstanceResult(instance))
                if kind == "started":
                    result.host = response.started.host or result.host
                elif kind in ("stdout", "stderr"):
                    writer.output(instance, kind, getattr(response, kind))
                elif kind == "result":
                    self._finish(writer, progress, result, response.result)
        finally:
            if ticker:
                ticker.cancel()
            progress.clear()
        if writer is None:
            raise Unavailable("the API server ended the stream before its plan")
        results = list(self.results.values())
        for r in results:
            if r.status == "pending":
                writer.end(r.instance_id)
                r.error = "the API server ended the stream without a result"
                writer.result(r)
        if isinstance(writer, GroupWriter):
            writer.close()
        self.err_text.write(summary(results))
        self.err_text.flush()
        return overall_exit(results)

    def _plan(self, plan: pb.FanoutPlan) -> tuple[LineWriter | JsonWriter, Progress]:
        for i in plan.instances:
            self.results[i.instance_id] = InstanceResult(
                i.instance_id, service=i.service, agent=i.agent, host=i.host)
        ids = list(self.results)
        progress = Progress(self.err_text, len(ids), enabled=_isatty(self.err_text))
        if self.json_output:
            writer = JsonWriter(self.out, {i.instance_id: i.host for i in plan.instances})
            writer.targets([{"instance": i.instance_id, "service": i.service, "agent": i.agent,
                             "host": i.host} for i in plan.instances])
            return writer, progress
        if self.group:
            return GroupWriter(self.out), progress
        return LineWriter(ids, self.out, self.err, prefix=self.prefix,
                          colour_out=self._colour(self.out), colour_err=self._colour(self.err),
                          before_write=progress.clear), progress

    def _finish(self, writer: LineWriter | JsonWriter, progress: Progress,
                result: InstanceResult, done: pb.FanoutResult) -> None:
        result.status = done.status
        result.code, result.signal = done.code, done.signal
        result.duration = done.duration_seconds
        result.host = done.host or result.host
        result.error = done.error.message if done.HasField("error") else ""
        writer.end(result.instance_id)
        writer.result(result)
        progress.done += 1
        if not result.ok:
            progress.failed += result.status not in NEVER_RAN
        progress.refresh()


async def _unbatched(stream: AsyncIterator[pb.FanoutResponse]
                     ) -> AsyncIterator[pb.FanoutResponse]:
    """The server's responses one by one, a FanoutBatch opened in order."""
    async for response in stream:
        if response.WhichOneof("msg") == "batch":
            for inner in response.batch.responses:
                if inner.WhichOneof("msg") == "batch":
                    raise Unavailable("the API server sent a batch inside a batch")
                yield inner
        else:
            yield response


async def _tick(progress: Progress) -> None:
    while True:
        await asyncio.sleep(Progress.REDRAW_EVERY)
        progress.refresh()


def _isatty(stream: object) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def fanout_job(target: str, command: list[str], connection: Connection, *,
               namespace: str | None, workdir: str, env: list[str], tty: bool | None,
               timeout: str, all_: bool, instances: list[str], selector: list[str],
               max_parallel: int, fail_fast: bool, prefix: bool, json_output: bool,
               rollout: RolloutFlags | None = None, group: bool = False) -> Job:
    """Checks the fan-out flags (usage errors exit 2) and gives the fan-out to run."""
    if tty:
        raise fail("a TTY cannot be used with fan-out (--all, --instances, --selector): "
                   "run without -t/--tty", 2)
    try:
        selected = parse_instances(instances)
        labels = parse_selector(selector)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    if not (all_ or selected or labels):
        raise fail("--json, --group, --prefix/--no-prefix, --fail-fast and the rollout flags "
                   "need --all, --instances or --selector", 2)
    if json_output and group:
        raise fail("--json and --group do not go together", 2)
    timeout_seconds, env_map = checked_flags(timeout, env, workdir)
    terms = (rollout or RolloutFlags()).checked()
    inv = current()
    options = FanoutOptions(
        target=target, command=command, namespace=namespace_of(inv, namespace, connection),
        all=all_, instances=selected, selector=labels, env=env_map, workdir=workdir,
        timeout=timeout_seconds, max_parallel=max_parallel, fail_fast=fail_fast, **terms)

    async def fanout(inv: Invocation) -> int:
        # Ctrl+C, SIGTERM, SIGHUP end the run as they end one exec (the members' commands
        # with it), here or relayed by a multiplexer, whatever the disposition rune was
        # started with (a shell's background job starts with SIGINT ignored).
        task = asyncio.current_task()
        stopped_by: list[int] = []

        def stop(signum: int) -> None:
            if not stopped_by and task is not None:
                stopped_by.append(signum)
                task.cancel()

        for signum in STOPPING_SIGNALS:
            inv.signals.add(signum, lambda s=signum: stop(s))
        try:
            async with connect(inv, connection) as client:
                return await FanoutCommand(client, options, json_output, prefix,
                                           inv.out_bytes, inv.err_bytes, inv.err, inv.env,
                                           group).run()
        except asyncio.CancelledError:
            if not stopped_by:
                raise
            inv.err.write("Error: interrupted\n")
            inv.err.flush()
            return 128 + stopped_by[0]
        finally:
            for signum in STOPPING_SIGNALS:
                inv.signals.remove(signum)

    return Job(fanout, "failed to initialize exec session")
