"""Follows each session's life for operators: audit events, recording, metrics, log lines.

The service and the relay call these hooks; none of them waits on the network,
so watching never slows a session down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from rune.apiserver.audit import Auditor
from rune.apiserver.metrics import ApiMetrics
from rune.apiserver.recording import Recordings

from rune import audit as schema
from rune.errors import RuneError

log = logging.getLogger("apiserver.sessions")


def request_fields(identity: Any, init: Any) -> dict[str, Any]:
    """What the caller asked for; env keys only, never their values."""
    return {"user": identity.user, "groups": list(identity.groups),
            "namespace": init.namespace or "default", "target": init.target,
            "argv": list(init.command), "tty": bool(init.tty), "workdir": init.workdir,
            "env_keys": sorted(init.env)}


def session_fields(record: Any) -> dict[str, Any]:
    i = record.instance
    return {"session_id": record.id, "instance": i.instance_id, "service": i.service,
            "agent": i.agent, "host": record.host or i.host, "runner": i.runner}


def _failure_reason(exc: BaseException | None, record: Any) -> tuple[str, str]:
    if record.kill_reason:
        return "killed", record.kill_reason
    if isinstance(exc, RuneError):
        return exc.code, exc.message
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled", "the client went away"
    if exc is None:
        return "internal", "the session ended without an exit status"
    return "internal", f"{type(exc).__name__}: {exc}"


def _log(event: dict[str, Any]) -> None:
    keys = ("session_id", "user", "namespace", "target", "instance", "agent", "argv", "tty",
            "exit_code", "signal", "duration", "bytes_in", "bytes_out", "code", "reason")
    text = " ".join(f"{k}={event[k]!r}" if isinstance(event[k], str) and " " in event[k]
                    else f"{k}={event[k]}" for k in keys if k in event)
    log.info("%s %s", event["event"], text, extra={"fields": event})


class Oversight:
    def __init__(self, auditor: Auditor | None = None, recordings: Recordings | None = None,
                 metrics: ApiMetrics | None = None) -> None:
        self.auditor = auditor
        self.recordings = recordings
        self.metrics = metrics
        self._requests: dict[str, tuple[Any, Any, float]] = {}

    def _emit(self, event: dict[str, Any]) -> None:
        event["source"] = "apiserver"
        if self.auditor is not None:
            self.auditor.emit(event)
        _log(event)

    def denied(self, identity: Any, init: Any, exc: RuneError) -> None:
        """The request was refused before any session existed (authz, target, arguments)."""
        self._emit(schema.make_event(schema.DENIED, **request_fields(identity, init),
                                     code=exc.code, reason=exc.message))
        if self.metrics:
            self.metrics.sessions.labels("denied").inc()

    def opening(self, record: Any, identity: Any, init: Any, received: float) -> None:
        self._requests[record.id] = (identity, init, received)

    def started(self, record: Any) -> None:
        """The agent accepted: the command runs (called by the relay once `started` is sent)."""
        identity, init, received = self._requests.get(record.id, (None, None, time.monotonic()))
        record.opened = time.time()
        if identity is None:
            return
        fields = {**request_fields(identity, init), **session_fields(record)}
        self._emit(schema.make_event(schema.STARTED, **fields))
        if self.metrics:
            self.metrics.active.inc()
            self.metrics.setup.observe(time.monotonic() - received)
        if init.tty and self.recordings is not None:
            meta = {"session_id": record.id, "user": identity.user, "namespace":
                    fields["namespace"], "instance": fields["instance"], "target": init.target,
                    "argv": fields["argv"], "started": record.started}
            record.tap = self.recordings.recorder(record.id, meta, init.width, init.height,
                                                  init.term)

    def ended(self, record: Any, exc: BaseException | None) -> None:
        """The session is over: `ended` with an exit status, else `failed` with the reason."""
        identity, init, _ = self._requests.pop(record.id, (None, None, 0.0))
        if identity is None:
            return
        duration = round(time.time() - record.started, 3)
        fields = {**request_fields(identity, init), **session_fields(record),
                  "duration": duration, "bytes_in": record.bytes_in,
                  "bytes_out": record.bytes_out}
        exited = record.exit_code is not None and not record.kill_reason
        if exited:
            event = schema.make_event(schema.ENDED, **fields, exit_code=record.exit_code,
                                      signal=record.signal)
            outcome = "success" if record.exit_code == 0 and not record.signal else "nonzero"
        else:
            code, reason = _failure_reason(exc, record)
            event = schema.make_event(schema.FAILED, **fields, code=code, reason=reason,
                                      stage="running" if record.opened else "open")
            outcome = "failed"
        self._emit(event)
        if record.tap is not None:
            record.tap.close({"ended": time.time(), "duration": duration,
                              "exit_code": record.exit_code, "signal": record.signal})
        m = self.metrics
        if m:
            if record.opened:
                m.active.dec()
            m.sessions.labels(outcome).inc()
            m.bytes.labels("in").inc(record.bytes_in)
            m.bytes.labels("out").inc(record.bytes_out)
            m.retransmits.inc(record.retransmits)
            m.stalls.inc(record.stalls)
            if record.lost:
                m.heartbeats_missed.inc()
            if record.kill_reason:
                m.killed.inc()


async def start_oversight(nc: Any, subjects: Any, config: Any) -> Oversight:
    """Audit stream, recordings stream and /metrics as configured (apiserver/config.py)."""
    metrics = ApiMetrics()
    auditor = Auditor(nc, subjects, config.audit)
    await auditor.start()
    metrics.watch_publisher("rune_audit_events", auditor.publisher)
    recordings = Recordings(nc, subjects, config.recording)
    await recordings.start()
    metrics.watch_publisher("rune_recording_chunks", recordings.publisher)
    if config.metrics_listen:
        from rune.metrics import serve

        serve(config.metrics_listen, metrics.registry)
    return Oversight(auditor, recordings, metrics)


async def stop_oversight(oversight: Oversight) -> None:
    for part in (oversight.auditor, oversight.recordings):
        if part is not None:
            await part.stop()
