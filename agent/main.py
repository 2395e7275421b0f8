"""`rune-agent --config agent.yaml`: runs one host's agent until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from rune.agent.config import load
from rune.agent.runners.reaper import REAPER
from rune.agent.server import Agent

from rune.errors import RuneError
from rune.heap import keep_freed_buffers
from rune.runtime import configure_logging, run


async def serve(config_path: str) -> None:
    agent = Agent(load(config_path))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    REAPER.enable()  # this process is the agent: it adopts what runc exec -d leaves
    try:
        await agent.start()
    except BaseException:
        REAPER.disable()
        raise
    print(f"rune-agent {agent.config.agent_id} ready", flush=True)
    await stop.wait()
    logging.getLogger(__name__).info("stopping")
    await agent.stop()
    REAPER.disable()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rune-agent", description=__doc__)
    parser.add_argument("--config", required=True, help="path of the agent's YAML config")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    keep_freed_buffers()  # process-wide: copy chunks reuse warm pages (rune/heap.py)
    try:
        run(serve(args.config))
    except (OSError, ValueError, RuneError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
