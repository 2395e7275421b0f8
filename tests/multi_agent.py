"""Many real agents in one process, each with its own NATS connection (scale tests, bench).

    python -m tests.multi_agent --nats-url URL --agents 20 --replicas 10 --state-dir DIR
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys

from rune.agent.config import AgentConfig
from rune.agent.server import Agent

from rune.runtime import configure_logging, run


def fleet_configs(nats_url: str, agents: int, replicas: int, state_dir: str,
                  service: str = "fleet", id_prefix: str = "m",
                  first: int = 0) -> list[AgentConfig]:
    """Agents first..first+agents-1, each running `replicas` cheap instances of `service`."""
    configs = []
    for n in range(first, first + agents):
        agent_id = f"{id_prefix}{n:03d}"
        configs.append(AgentConfig.model_validate({
            "agent_id": agent_id, "host": f"host-{agent_id}", "nats": {"url": nats_url},
            "state_dir": f"{state_dir}/{agent_id}", "max_sessions": max(256, replicas * 2),
            "services": [{"name": service, "replicas": replicas,
                          "labels": {"rack": f"r{n % 4}"},
                          "command": ["sleep", "2147483647"]}],
        }))
    return configs


async def serve(configs: list[AgentConfig]) -> None:
    agents = [Agent(c) for c in configs]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await asyncio.gather(*(a.start() for a in agents))
    print(f"{len(agents)} agents ready", flush=True)
    await stop.wait()
    await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)


def start_fleet(stack: object, agents: int, replicas: int, service: str = "fleet",
                id_prefix: str = "m", timeout: float = 120.0,
                processes: int = 1) -> list[subprocess.Popen]:
    """Spawns the fleet (agents spread over `processes`) under `stack`; waits until it runs."""
    from rune.cli.devstack import wait_until

    procs = []
    per = -(-agents // processes)
    for first in range(0, agents, per):
        argv = [sys.executable, "-m", "tests.multi_agent", "--nats-url", stack.nats_url,
                "--agents", str(min(per, agents - first)), "--first", str(first),
                "--replicas", str(replicas), "--service", service, "--id-prefix", id_prefix,
                "--state-dir", str(stack.state_dir / "fleet"), "--log-level", "WARNING"]
        procs.append(stack._spawn(f"fleet-{id_prefix}-{first}", argv))
    expected = agents * replicas

    def running() -> bool:
        items = asyncio.run(stack._list())
        return sum(1 for i in items if i.service == service and i.state == "running") \
            >= expected

    wait_until(running, f"fleet of {expected} instances", timeout=timeout, proc=procs[0],
               log=stack.logs / f"fleet-{id_prefix}-0.log")
    return procs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="multi_agent", description=__doc__)
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="number of the first agent")
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--service", default="fleet")
    parser.add_argument("--id-prefix", default="m")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    run(serve(fleet_configs(args.nats_url, args.agents, args.replicas, args.state_dir,
                            args.service, args.id_prefix, args.first)))


if __name__ == "__main__":
    main()
