"""What a bench section gets: the running stack, the baselines' servers, sizes and helpers."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rune.cli.devstack import Stack

from bench.dockerbox import DockerBox
from bench.producer import Producer
from bench.sshd import Sshd

ROOT = Path(__file__).resolve().parent.parent
TARGET = "api"


@dataclass(frozen=True)
class Sizes:
    """How much each section measures; --quick shrinks everything to a smoke test."""

    setup_n: int = 200            # in-process round trips, ssh, docker exec, NATS floor
    cli_n: int = 200              # whole `rune exec` CLI processes
    stream_bytes: int = 1 << 30   # stdout throughput
    stream_rounds: int = 3        # each contender once a round, taking turns; the median
    echo_n: int = 200             # keystrokes
    fanout: tuple[int, ...] = (10, 100, 500, 1000, 5000)  # 1,000 and 5,000 over 100 agents
    fanout_runs: int = 5          # fan-outs timed at each size
    sessions: tuple[int, ...] = (200, 500)
    loaded_setup_n: int = 50      # setup latency while the idle sessions are open
    warmup: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(setup_n=20, cli_n=8, stream_bytes=8 << 20, stream_rounds=1, echo_n=20,
                   fanout=(10,),
                   fanout_runs=2, sessions=(10, 20), loaded_setup_n=5, warmup=1)


@dataclass
class BenchContext:
    stack: Stack
    workdir: Path
    quick: bool
    sizes: Sizes
    sshd: Sshd | None = None
    sshd_reason: str = ""
    docker: DockerBox | None = None  # adopted by the bench's agent: rune's container target
    docker_reason: str = ""
    producer: Producer | None = None
    producer_reason: str = ""
    target: str = TARGET
    agent_id: str = "bench"
    extra: dict = field(default_factory=dict)

    @property
    def api_address(self) -> str:
        return self.stack.api_address

    @property
    def env(self) -> dict[str, str]:
        """The environment for `rune` processes: no user config file gets in the way, and
        their multiplexer is the bench's own (never one of the user's, or of another tree)."""
        return {**os.environ, "RUNE_CONFIG": str(self.workdir / "no-config.yaml"),
                "RUNE_MUX_DIR": str(self.mux_dir)}

    @property
    def mux_dir(self) -> Path:
        return self.workdir / "mux"

    def rune_argv(self, *args: str) -> list[str]:
        """`rune exec ARGS...` against the bench's apiserver, as a separate CLI process."""
        return [sys.executable, "-m", "rune.cli.main", "exec", "--api-server", self.api_address,
                *args]

    def pid(self, name: str) -> int:
        """The pid of a stack process: "apiserver", "nats" or "agent-<id>"."""
        return self.stack.procs[name].pid
