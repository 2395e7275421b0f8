"""Section 6: the CLI multiplexer: warm, cold and without it, beside docker exec and ssh -M.

Every rune row here runs the `rune` console script (the fast path) with a multiplexer
socket directory of the bench's own, so no user's multiplexer is used or left behind.
The rows run rune as users install it, from the wheel of this tree in a venv of the
bench's own (bench/installed.py); one more warm row runs the editable install beside it.

    python bench/mux.py [--runs 200] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/mux.py`: the repo root holds bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rune.cli import muxwire  # noqa: E402

from bench import rows  # noqa: E402
from bench.context import BenchContext, Sizes  # noqa: E402
from bench.installed import installed_rune  # noqa: E402
from bench.keystroke_echo import ECHO, echo_times  # noqa: E402
from bench.procs import drain, timed_run, timed_runs  # noqa: E402

SECTION = "6. the CLI multiplexer"
WARM, NOMUX, COLD = "mux.warm", "mux.nomux", "mux.cold"  # cold: compare with nomux by eye
WARM_EDITABLE = "mux.warm_editable"
COLD_RUNS = 20


class MuxRuns:
    """`rune` command lines against the bench's stack, with or without a multiplexer."""

    def __init__(self, ctx: BenchContext, script: Path) -> None:
        self.ctx = ctx
        self.folder = tempfile.mkdtemp(prefix="rmux-bench-")
        self.rune = [str(script)]
        self.env = {**ctx.env, "RUNE_MUX_DIR": self.folder, "RUNE_MUX": "auto"}

    def argv(self, *args: str, mux: bool = True) -> list[str]:
        return [*self.rune, *([] if mux else ["--no-mux"]), "exec", "--api-server",
                self.ctx.api_address, *args]

    def stop(self) -> None:
        """Stops the multiplexer (if any) and waits until it has gone."""
        try:
            pid = int(Path(muxwire.pid_path(self.folder)).read_text())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(muxwire.socket_path(self.folder)).exists():
            time.sleep(0.01)
        time.sleep(0.05)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def run(ctx: BenchContext) -> list[dict]:
    n, warmup, size = ctx.sizes.cli_n, ctx.sizes.warmup, ctx.sizes.stream_bytes
    runs = MuxRuns(ctx, installed_rune(ctx.workdir))
    editable = MuxRuns(ctx, Path(sys.executable).parent / "rune")
    true = (ctx.target, "true")
    out: list[dict] = []
    try:
        warm = "`rune exec api true`, warm multiplexer (wheel install)"
        out.append(_guard(WARM, warm, lambda: rows.latency(
            WARM, SECTION, warm, timed_runs(runs.argv(*true), n, warmup, runs.env))))
        warm_editable = "`rune exec api true`, warm multiplexer (editable install)"
        out.append(_guard(WARM_EDITABLE, warm_editable, lambda: rows.latency(
            WARM_EDITABLE, SECTION, warm_editable,
            timed_runs(editable.argv(*true), n, warmup, editable.env), ref=WARM)))
        editable.close()
        out.append(_guard(NOMUX, "`rune --no-mux exec api true`", lambda: rows.latency(
            NOMUX, SECTION, "`rune --no-mux exec api true`",
            timed_runs(runs.argv(*true, mux=False), n, warmup, runs.env), ref=WARM)))
        out.append(_guard(COLD, "`rune exec api true`, no multiplexer yet (starts one)",
                          lambda: rows.latency(
                              COLD, SECTION,
                              "`rune exec api true`, no multiplexer yet (starts one)",
                              _cold(runs, max(3, min(n // 10, COLD_RUNS))))))
        out.append(_docker(ctx, n, warmup))
        out.append(_ssh_master(ctx, n, warmup))
        produce = ["head", "-c", str(size), "/dev/zero"]
        label = f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"
        for row_id, mux in (("mux.stream", True), ("mux.stream_nomux", False)):
            name = f"{label} stdout, non-TTY, {'through the multiplexer' if mux else '--no-mux'}"
            out.append(_guard(row_id, name, lambda mux=mux, name=name, row_id=row_id:
                              rows.throughput(row_id, SECTION, name, size, drain(
                                  runs.argv("--no-tty", ctx.target, *produce, mux=mux), size,
                                  runs.env, log=ctx.workdir / "rune-mux.log"),
                                  ref=None if mux else "mux.stream")))
        for row_id, mux in (("mux.echo", True), ("mux.echo_nomux", False)):
            name = f"keystroke echo through `cat`, {'multiplexer' if mux else '--no-mux'}"
            out.append(_guard(row_id, name, lambda mux=mux, name=name, row_id=row_id:
                              rows.latency(row_id, SECTION, name, echo_times(
                                  runs.argv("-t", ctx.target, *ECHO, mux=mux),
                                  ctx.sizes.echo_n, warmup, runs.env),
                                  ref=None if mux else "mux.echo")))
    finally:
        editable.close()
        runs.close()
    return out


def _cold(runs: MuxRuns, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        runs.stop()
        samples.append(timed_run(runs.argv(runs.ctx.target, "true"), runs.env))
    return samples


def _docker(ctx: BenchContext, n: int, warmup: int) -> dict:
    name = "`docker exec CONTAINER true`"
    if not ctx.docker:
        return rows.absent("mux.docker", SECTION, name, rows.SKIPPED, ctx.docker_reason)
    return _guard("mux.docker", name, lambda: rows.latency(
        "mux.docker", SECTION, name, timed_runs(ctx.docker.argv("true"), n, warmup), ref=WARM))


def _ssh_master(ctx: BenchContext, n: int, warmup: int) -> dict:
    """`ssh localhost true` through a warm ControlMaster (ControlPersist)."""
    name = "`ssh localhost true`, warm ControlMaster"
    if not ctx.sshd:
        return rows.absent("mux.ssh", SECTION, name, rows.SKIPPED, ctx.sshd_reason)
    control = tempfile.mkdtemp(prefix="ssh-cm-")
    base = ctx.sshd.argv("true")
    options = ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}/cm",
               "-o", "ControlPersist=120"]
    argv = [base[0], *options, *base[1:]]
    try:
        return _guard("mux.ssh", name, lambda: rows.latency(
            "mux.ssh", SECTION, name, timed_runs(argv, n, max(1, warmup)), ref=WARM))
    finally:
        subprocess.run([base[0], *options, "-O", "exit", *base[1:-1]], capture_output=True,
                       timeout=30, stdin=subprocess.DEVNULL)
        shutil.rmtree(control, ignore_errors=True)


def _guard(row_id: str, name: str, measure: object) -> dict:
    return rows.guarded(row_id, SECTION, name, measure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    from bench.harness import standalone

    standalone(run, dataclasses.replace(Sizes(), cli_n=args.runs,
                                        stream_bytes=args.size_mib << 20))


if __name__ == "__main__":
    main()
