"""A minimal ops dashboard: prints Rune Exec audit events live from NATS (nats-py only).

    python examples/audit_dashboard.py --server nats://127.0.0.1:4222
    python examples/audit_dashboard.py --nkey-seed /etc/rune/audit-reader.nk   # secured broker
    python examples/audit_dashboard.py --history 1h    # first what the stream kept, then live

No broker of Rune accepts anonymous clients, the local dev stack included: give
the audit reader's nkey seed (`--nkey-seed`) or a `.creds` file (`--creds`). That
user may only read `rune.audit.>` and the audit stream. `rune dev up` writes its
seed to `<state dir>/broker/audit-reader.nk` (by default
`~/.local/state/rune/dev/broker/audit-reader.nk`). Without either flag it tries an
anonymous connection, which only a broker you run without authentication accepts.

For live sessions, observing, killing, search and playback in a browser, use
`rune-dashboard` instead (README, "Ops dashboard"). The events are the JSON
documented in the README ("Audit events"); this file depends on nothing from Rune.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy


def line(event: dict) -> str:
    kind = event["event"].removeprefix("session.")
    if kind == "ended":
        result = f"signal {event['signal']}" if event.get("signal") else \
            f"exit {event.get('exit_code')}"
    elif kind in ("denied", "failed"):
        result = f"{event.get('code')}: {event.get('reason')}"
    else:
        result = ""
    where = event.get("instance") or event.get("target", "")
    return (f"{event['time']}  {kind:<7}  {event.get('user', ''):<12}  "
            f"{event.get('namespace', '')}/{where}  {' '.join(event.get('argv', []))}  {result}")


def since(text: str) -> datetime:
    number, unit = re.fullmatch(r"(\d+)([smhd])", text).groups()
    seconds = int(number) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    return datetime.now(UTC) - timedelta(seconds=seconds)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="nats://127.0.0.1:4222")
    parser.add_argument("--nkey-seed", help="the audit reader's nkey seed file")
    parser.add_argument("--creds", help="a NATS .creds file (JWT setups)")
    parser.add_argument("--prefix", default="rune", help="subject prefix of the fleet")
    parser.add_argument("--history", help="replay this much from the stream first (e.g. 1h)")
    parser.add_argument("--max-events", type=int, default=0, help="stop after N (0: never)")
    args = parser.parse_args()
    options = {}
    if args.nkey_seed:
        options["nkeys_seed"] = args.nkey_seed
    if args.creds:
        options["user_credentials"] = args.creds
    # The audit reader may receive replies only under its own inbox prefix (--history).
    nc = await nats.connect(args.server, name="audit-dashboard",
                            inbox_prefix=f"_INBOX_{args.prefix}.audit", **options)
    subject = f"{args.prefix}.audit.>"
    if args.history:  # the JetStream stream keeps events; an ordered consumer replays them
        sub = await nc.jetstream().subscribe(
            subject, stream=f"{args.prefix.upper()}_AUDIT", ordered_consumer=True,
            deliver_policy=DeliverPolicy.BY_START_TIME,
            config=ConsumerConfig(opt_start_time=since(args.history)))
    else:  # live only: a plain subscription, nothing stored on the server for us
        sub = await nc.subscribe(subject)
    print(f"listening on {subject}", flush=True)
    totals: Counter[str] = Counter()
    try:
        async for msg in sub.messages:
            event = json.loads(msg.data)
            if event.get("version") != 1:
                continue  # a newer schema: fields may have changed meaning
            totals[event["event"]] += 1
            print(line(event), flush=True)
            if args.max_events and sum(totals.values()) >= args.max_events:
                break
    finally:
        print("totals: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())),
              flush=True)
        await nc.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
