"""`python -m bench [--quick] [--json PATH]`: start everything on loopback, measure, stop it all."""

from __future__ import annotations

import argparse
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import report, runner
from bench.context import ROOT, BenchContext, Sizes
from bench.dockerbox import DockerBox, DockerUnavailable
from bench.sshd import Sshd, SshdUnavailable
from cli.devstack import Stack, free_port

AGENT_ID = "bench"
SERVICES = [{"name": "api", "namespace": "default", "replicas": 1,
             "command": ["sh", "-c", "exec sleep 2147483647"]}]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and counts: a smoke test (CI), not a measurement")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json",
                        help="where to write the JSON results (default: %(default)s)")
    parser.add_argument("--only", default="",
                        help=f"comma-separated sections: {','.join(runner.section_names())}")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    return parser.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop everything


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(runner.section_names())
    if unknown:
        print(f"Error: unknown section(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    # Hundreds of sessions need hundreds of PTYs and sockets in the children we start.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sizes = Sizes.quick() if args.quick else Sizes()
    workdir = Path(tempfile.mkdtemp(prefix="rune-bench-"))
    began = time.monotonic()
    stack = Stack(workdir / "stack", nats_port=free_port(), api_port=free_port())
    ctx = BenchContext(stack=stack, workdir=workdir, quick=args.quick, sizes=sizes,
                       agent_id=AGENT_ID)
    try:
        print(f"bench: starting nats-server, rune-apiserver, rune-agent in {workdir}",
              file=sys.stderr, flush=True)
        stack.start_nats()
        stack.start_apiserver()
        stack.start_agent(AGENT_ID, SERVICES, {"max_sessions": max(sizes.sessions) + 100})
        _start_baselines(ctx)
        results, timings = runner.run_all(ctx, only)
    finally:
        _stop_baselines(ctx)
        stack.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    meta = report.meta_for(args.quick, time.monotonic() - began) | {"section_seconds": timings}
    print(report.markdown(results, meta))
    report.write_json(args.json, results, meta)
    print(f"\nbench: JSON written to {args.json}", file=sys.stderr)
    return 0


def _start_baselines(ctx: BenchContext) -> None:
    sshd = Sshd(ctx.workdir)
    try:
        sshd.start()
        ctx.sshd = sshd
    except SshdUnavailable as exc:
        ctx.sshd_reason = str(exc)
    docker = DockerBox()
    try:
        docker.start()
        ctx.docker = docker
    except (DockerUnavailable, OSError) as exc:
        docker.stop()
        ctx.docker_reason = str(exc)


def _stop_baselines(ctx: BenchContext) -> None:
    if ctx.docker:
        ctx.docker.stop()
    if ctx.sshd:
        ctx.sshd.stop()


if __name__ == "__main__":
    sys.exit(main())
