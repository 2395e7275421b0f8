"""Several apiservers as one: live sessions and per-user counts shared through NATS.

Each apiserver writes its live sessions into the KV bucket `<prefix>_sessions`
(key `s.<apiserver>.<session>`, a small JSON summary) and a lease (`lease.<apiserver>`,
rewritten every LEASE_EVERY seconds), and watches the whole bucket, so it knows
every apiserver's sessions without a request on the exec path:

- `rune sessions list` on any apiserver shows them all;
- `rune sessions kill` on any apiserver reaches the owner over
  `<prefix>.apiserver.<owner>.kill` (the asking apiserver has checked RBAC; the owner
  ends the session and audits `session.killed` with the operator and reason, as it does
  for a kill asked of it directly);
- `max_sessions_per_user/agent` count every apiserver's sessions.

Writes never wait: they are gathered and written by one task every WRITE_EVERY seconds
(latest state per key); a session that starts and ends between two writes (a fan-out
member running `true`) is never written, so the broker does not carry two messages per
such member to every apiserver. An apiserver whose
lease is older than LEASE_LOST seconds (by the wall clock: keep the apiservers' clocks
in sync) is gone: its sessions no longer count or show, and the first apiserver to
notice purges them. Counts between apiservers lag by WRITE_EVERY and the broker's
latency, so two sessions opened within that time on two apiservers may pass a cap by one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError
from rune.apiserver.auth import Identity

from rune.subjects import Subjects

log = logging.getLogger(__name__)

LEASE_EVERY = 2.0
LEASE_LOST = 6.0  # three leases missed
KILL_TIMEOUT = 3.0
WRITE_EVERY = 0.1
PURGE = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}  # as nats-py's KeyValue.purge


def summary(record: Any, apiserver: str) -> dict[str, Any]:
    """What another apiserver needs of a live session: to list it, count it, kill it."""
    i = record.instance
    return {"session_id": record.id, "apiserver": apiserver, "user": record.user,
            "namespace": i.namespace, "instance": i.instance_id,
            # An observer loads no agent: it counts per user only.
            "agent": i.agent if getattr(record, "on_agent", True) else "",
            "argv": record.argv[:64], "tty": record.tty, "started": record.started,
            "kind": record.kind, "fanout_id": record.fanout_id}


class SessionBoard:
    def __init__(self, nc: NATS, subjects: Subjects, apiserver_id: str,
                 kill_local: Callable[[str, Any, str], bool]) -> None:
        self.nc = nc
        self.subjects = subjects
        self.id = apiserver_id
        self._kill_local = kill_local
        self._kv = None
        self._remote: dict[str, dict[str, Any]] = {}  # session id -> summary (others only)
        # apiserver -> its sessions per user and per agent: a limit check is not a scan
        self._counts: dict[str, tuple[Counter[str], Counter[str]]] = {}
        self._heard: dict[str, float] = {}  # apiserver -> wall time its last lease was written
        # key -> the live record to write (summarised when written), or None to purge it
        self._writes: dict[str, Any] = {}
        self._unwritten: set[str] = set()  # keys added but not written yet
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.ready = asyncio.Event()

    async def start(self) -> None:
        js = self.nc.jetstream()
        try:
            self._kv = await js.key_value(self.subjects.sessions_bucket)
        except BucketNotFoundError:
            self._kv = await js.create_key_value(KeyValueConfig(
                bucket=self.subjects.sessions_bucket, history=1))
        await self.nc.subscribe(self.subjects.apiserver_kill(self.id), cb=self._on_kill)
        self._tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._write()),
                       asyncio.create_task(self._lease())]
        try:
            await asyncio.wait_for(self.ready.wait(), 10.0)
        except TimeoutError:
            log.warning("session board: the bucket's current state did not arrive in 10s")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._kv is not None:
            try:
                await self._kv.delete(f"lease.{self.id}")
            except Exception:
                pass

    # --- this apiserver's sessions -------------------------------------------------------

    def added(self, record: Any) -> None:
        key = f"s.{self.id}.{record.id}"
        self._writes[key] = record
        self._unwritten.add(key)
        self._wake.set()

    def removed(self, record: Any) -> None:
        self._purge(f"s.{self.id}.{record.id}")

    def _purge(self, key: str) -> None:
        if key in self._unwritten:  # never written: nothing to take back
            self._unwritten.discard(key)
            self._writes.pop(key, None)
            return
        self._writes[key] = None
        self._wake.set()

    # --- every other apiserver's --------------------------------------------------------

    def alive(self, apiserver: str) -> bool:
        heard = self._heard.get(apiserver)
        return heard is not None and time.time() - heard < LEASE_LOST

    def remote(self) -> list[dict[str, Any]]:
        """The live sessions of the other apiservers that are still alive."""
        return [s for s in self._remote.values() if self.alive(s["apiserver"])]

    def counts(self, user: str, agent: str) -> tuple[int, int]:
        """How many sessions the other apiservers run for `user`, and on `agent`."""
        users = agents = 0
        for apiserver, (per_user, per_agent) in self._counts.items():
            if self.alive(apiserver):
                users += per_user[user]
                agents += per_agent[agent]
        return users, agents

    def _remember(self, session_id: str, session: dict[str, Any]) -> None:
        self._forget(session_id)
        self._remote[session_id] = session
        per_user, per_agent = self._counts.setdefault(session["apiserver"],
                                                      (Counter(), Counter()))
        per_user[str(session.get("user"))] += 1
        per_agent[str(session.get("agent"))] += 1

    def _forget(self, session_id: str) -> None:
        session = self._remote.pop(session_id, None)
        if session is None:
            return
        per_user, per_agent = self._counts[session["apiserver"]]
        for counter, key in ((per_user, str(session.get("user"))),
                             (per_agent, str(session.get("agent")))):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
        if not per_user and not per_agent:
            del self._counts[session["apiserver"]]

    def find(self, session_id: str) -> dict[str, Any] | None:
        found = self._remote.get(session_id)
        return found if found is not None and self.alive(found["apiserver"]) else None

    async def kill(self, session: dict[str, Any], operator: Any, why: str) -> bool:
        """Asks the owning apiserver to end one of its sessions; True when it did."""
        request = {"session_id": session["session_id"], "user": operator.user,
                   "groups": list(operator.groups), "reason": why}
        try:
            reply = await self.nc.request(
                self.subjects.apiserver_kill(session["apiserver"]),
                json.dumps(request).encode(), timeout=KILL_TIMEOUT)
            return bool(json.loads(reply.data).get("killed"))
        except Exception as exc:
            log.warning("kill of session %s on apiserver %s failed: %s",
                        session["session_id"], session["apiserver"], exc)
            return False

    # --- the tasks --------------------------------------------------------------------

    async def _on_kill(self, msg: Any) -> None:
        try:
            request = json.loads(msg.data)
            operator = Identity(user=str(request["user"]),
                                groups=tuple(str(g) for g in request.get("groups", ())))
            killed = self._kill_local(str(request["session_id"]), operator,
                                      str(request["reason"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            killed = False
        try:
            await msg.respond(json.dumps({"killed": killed}).encode())
        except Exception:
            pass

    async def _write(self) -> None:
        """Sessions are written without waiting for JetStream's ack (a fan-out of thousands
        must not pay a round trip per member); the lease, acked, says whether writes land."""
        prefix = f"$KV.{self.subjects.sessions_bucket}."
        while True:
            await self._wake.wait()
            await asyncio.sleep(WRITE_EVERY)  # gather what changes meanwhile
            self._wake.clear()
            writes, self._writes = self._writes, {}
            self._unwritten.clear()
            for key, value in writes.items():
                try:
                    if value is None:
                        await self.nc.publish(prefix + key, b"", headers=PURGE)
                    else:
                        await self.nc.publish(prefix + key,
                                              json.dumps(summary(value, self.id)).encode())
                except Exception as exc:
                    log.warning("session board: cannot write %s (%s)", key, exc)

    async def _lease(self) -> None:
        while True:
            try:
                await self._kv.put(f"lease.{self.id}", b"%f" % time.time())
                self._purge_gone()
            except Exception as exc:
                log.warning("session board: cannot renew the lease (%s)", exc)
            await asyncio.sleep(LEASE_EVERY)

    def _purge_gone(self) -> None:
        """Sessions of apiservers gone for good are removed from the bucket."""
        for session_id, s in list(self._remote.items()):
            owner = s["apiserver"]
            if not self.alive(owner) and owner in self._heard:
                self._purge(f"s.{owner}.{session_id}")
                self._forget(session_id)

    async def _follow(self) -> None:
        while True:
            try:
                watcher = await self._kv.watchall()
                async for entry in watcher:
                    if entry is None:
                        self.ready.set()
                        continue
                    self._apply(entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("session board: watch failed (%s); watching again", exc)
            await asyncio.sleep(0.5)

    def _apply(self, entry: Any) -> None:
        parts = entry.key.split(".")
        gone = entry.operation in ("DEL", "PURGE") or not entry.value
        if parts[0] == "lease" and len(parts) == 2:
            if gone:
                self._heard.pop(parts[1], None)
                return
            try:
                self._heard[parts[1]] = float(entry.value)
            except ValueError:
                pass
        elif parts[0] == "s" and len(parts) == 3 and parts[1] != self.id:
            if gone:
                self._forget(parts[2])
                return
            try:
                session = json.loads(entry.value)
            except ValueError:
                return
            if isinstance(session, dict) and session.get("apiserver") == parts[1]:
                self._remember(parts[2], session)
