"""Benchmarks: rune beside ssh, docker exec, bare NATS and local pipes/PTYs, in one run.

Run with `python -m bench` (full) or `python -m bench --quick` (smoke test).

A section is a module `bench/<name>.py` listed in bench.runner.SECTIONS. It exposes
`run(ctx: bench.context.BenchContext) -> list[dict]` (plain or async) and builds its rows
with the helpers in bench.rows; the runner catches its failures and, when the module does
not exist yet, prints its rows as "not landed".
"""

import os

# Sections fork PTY children after using gRPC in this process: keep gRPC's fork handlers out.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
