"""Connecting to NATS the same way in every program: nkeys credentials, endless reconnects."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import nats
import nats.aio.client
from nats.aio.client import Client as NATS

log = logging.getLogger(__name__)
# nats-py reads the socket 32 KiB at a time and copies its buffer on every read, so a
# ~1 MiB frame costs dozens of reads and copies; it has no option for this, only the
# module constant (read at connect and on every read). 1 MiB: one frame, one read.
READ_BUFFER = 1024 * 1024


async def connect(
    url: str,
    name: str,
    nkey_seed_file: str | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    inbox_prefix: str | None = None,
) -> NATS:
    async def error_cb(exc: Exception) -> None:
        log.warning("nats: %s: %s", type(exc).__name__, exc)

    async def disconnected_cb() -> None:
        log.warning("nats: disconnected from %s", url)

    async def reconnected_cb() -> None:
        log.info("nats: reconnected to %s", url)
        if on_reconnect:
            await on_reconnect()

    nats.aio.client.DEFAULT_BUFFER_SIZE = max(nats.aio.client.DEFAULT_BUFFER_SIZE, READ_BUFFER)
    options: dict = {}
    if nkey_seed_file:
        options["nkeys_seed"] = nkey_seed_file
    if inbox_prefix:
        options["inbox_prefix"] = inbox_prefix
    return await nats.connect(
        # A comma-separated list names several cluster nodes: reconnects go to any of them.
        servers=[u.strip() for u in url.split(",") if u.strip()],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=2,
        allow_reconnect=True,
        pending_size=16 * 1024 * 1024,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        **options,
    )
