"""What every server process does the same way: logging setup and the event loop."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
from collections.abc import Coroutine


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)  # structured extras (session lines)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# A session allocates a few hundred container objects that live until it ends: with the
# interpreter's default (a young collection every 700), a server running a fan-out spends
# about a tenth of its time collecting, mostly re-scanning sessions still alive.
YOUNG_COLLECTION_EVERY = 20_000


def settle_heap() -> None:
    """Once a server has started: what it built so far (modules, config, clients) is moved
    out of the collector's sight (gc.freeze), and young collections are rarer. Cycles are
    still collected; only how often the collector looks changes."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, old)


def run(main: Coroutine) -> object:
    """Runs a coroutine on uvloop where installed (faster relays), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
