"""`python -m bench [--quick] [--json PATH]`: start everything on loopback, measure, stop it all."""

from __future__ import annotations

import argparse
import resource
import signal
import sys
import time
from pathlib import Path

from bench import report, runner
from bench.context import ROOT, Sizes
from bench.harness import bench_context


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
    began = time.monotonic()
    with bench_context(sizes, args.quick, args.keep) as ctx:
        results, timings = runner.run_all(ctx, only)
    meta = report.meta_for(args.quick, time.monotonic() - began) | {"section_seconds": timings}
    print(report.markdown(results, meta))
    report.write_json(args.json, results, meta)
    print(f"\nbench: JSON written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
