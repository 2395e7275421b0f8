"""Follows each session's life for operators: audit events, recording, metrics, log lines.

The session core calls these hooks; none of them waits on the network,
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
from rune.display import printable
from rune.errors import RuneError

log = logging.getLogger("rune.apiserver.sessions")


MAX_AUDIT_ARGV = 4096  # bytes of argv an event carries; the rest is cut (and marked)
DENIALS_PER_SECOND = 5.0  # per user: past this, denials are counted, not each published
DENIAL_BURST = 20
QUIET_MEMBER_EVENTS = frozenset((schema.STARTED, schema.ENDED))  # logged at debug


def audit_argv(argv: Any) -> tuple[list[str], bool]:
    """argv cut to MAX_AUDIT_ARGV bytes in all, so one request cannot flood the stream."""
    kept, used = [], 0
    for arg in argv:
        room = MAX_AUDIT_ARGV - used
        size = len(arg.encode("utf-8", "surrogateescape"))
        if size > room:
            if room > 0:
                kept.append(arg.encode("utf-8", "surrogateescape")[:room].decode(
                    "utf-8", "ignore"))
            return kept, True
        kept.append(arg)
        used += size
    return kept, False


def request_fields(identity: Any, spec: Any) -> dict[str, Any]:
    """What the caller asked for; env keys only, never their values."""
    argv, cut = audit_argv(getattr(spec, "argv", None) or [])
    fields = {"user": identity.user, "groups": list(identity.groups),
              "namespace": getattr(spec, "namespace", "") or "default",
              "target": str(getattr(spec, "target", ""))[:256], "argv": argv,
              "tty": bool(getattr(spec, "tty", False)),
              "workdir": str(getattr(spec, "workdir", ""))[:4096],
              "env_keys": sorted(getattr(spec, "env", None) or {})[:256]}
    if cut:
        fields["argv_truncated"] = True
    return fields


def session_fields(record: Any) -> dict[str, Any]:
    i = record.instance
    fields = {"session_id": record.id, "instance": i.instance_id, "service": i.service,
              "agent": i.agent, "host": record.host or i.host, "runner": i.runner,
              "kind": record.kind}
    if record.fanout_id:
        fields["fanout_id"] = record.fanout_id
    return fields


class DenialLimiter:
    """A token bucket per user: a flood of refused requests costs the stream little."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self.suppressed: dict[str, int] = {}

    def admit(self, user: str) -> int | None:
        """None: suppress this one. Otherwise how many were suppressed before it."""
        now = time.monotonic()
        tokens, last = self._buckets.get(user, (float(DENIAL_BURST), now))
        tokens = min(DENIAL_BURST, tokens + (now - last) * DENIALS_PER_SECOND)
        if tokens < 1:
            self._buckets[user] = (tokens, now)
            self.suppressed[user] = self.suppressed.get(user, 0) + 1
            return None
        self._buckets[user] = (tokens - 1, now)
        if len(self._buckets) > 10000:  # forget the quiet ones, so memory stays bounded
            self._buckets = {u: b for u, b in self._buckets.items() if b[0] < DENIAL_BURST}
        return self.suppressed.pop(user, 0)


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
    # A fan-out member's start and end are in the audit trail like any session's; the log
    # says them at debug, as thousands of lines per run cost the apiserver half its time
    # per member. The fan-out's own start and end lines (apiserver/fanout.py) stay at info.
    level = logging.DEBUG if event.get("fanout_id") and event["event"] in QUIET_MEMBER_EVENTS \
        else logging.INFO
    if not log.isEnabledFor(level):
        return
    keys = ("session_id", "fanout_id", "user", "namespace", "target", "instance", "agent",
            "argv", "tty", "exit_code", "signal", "duration", "bytes_in", "bytes_out", "code",
            "reason", "suppressed")
    text = " ".join(f"{k}={_shown(event[k])}" for k in keys if k in event)
    log.log(level, "%s %s", event["event"], text, extra={"fields": event})


def _shown(value: Any) -> str:
    """A log value that cannot forge a line: control characters escaped, spaces quoted."""
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    text = printable(str(value))
    return f"'{text}'" if isinstance(value, str) and (" " in text or not text) else text


class Oversight:
    def __init__(self, auditor: Auditor | None = None, recordings: Recordings | None = None,
                 metrics: ApiMetrics | None = None) -> None:
        self.auditor = auditor
        self.recordings = recordings
        self.metrics = metrics
        self._requests: dict[str, tuple[Any, Any, float]] = {}
        self.denials = DenialLimiter()
        # The members of a fan-out share one identity and one spec: their request fields
        # are worked out once (argv cut, env keys sorted), not twice per member.
        self._last_request: tuple[Any, Any, dict[str, Any]] | None = None

    def _request_fields(self, identity: Any, spec: Any) -> dict[str, Any]:
        last = self._last_request
        if last is not None and last[0] is identity and last[1] is spec:
            return last[2]
        fields = request_fields(identity, spec)
        self._last_request = (identity, spec, fields)
        return fields

    def _emit(self, event: dict[str, Any]) -> None:
        event["source"] = "apiserver"
        if self.auditor is not None:
            self.auditor.emit(event)
        _log(event)

    def denied(self, identity: Any, spec: Any, exc: RuneError, fanout_id: str = "") -> None:
        """The request was refused before any session existed (authz, target, arguments)."""
        if self.metrics:
            self.metrics.sessions.labels("denied").inc()
        suppressed = self.denials.admit(identity.user)
        if suppressed is None:
            return
        fields = request_fields(identity, spec)
        if fanout_id:
            fields["fanout_id"] = fanout_id
        if suppressed:
            fields["suppressed"] = suppressed  # denials of this user not published before
        self._emit(schema.make_event(schema.DENIED, **fields, code=exc.code,
                                     reason=exc.message[:1024]))

    def operator(self, event: dict[str, Any]) -> None:
        """An operator acted on someone's session (killed it): published and logged."""
        self._emit(event)

    def opening(self, record: Any, identity: Any, spec: Any, received: float) -> None:
        self._requests[record.id] = (identity, spec, received)

    def started(self, record: Any) -> None:
        """The agent accepted: the command runs (called by the core once `started` is sent)."""
        identity, spec, received = self._requests.get(record.id, (None, None, time.monotonic()))
        record.opened = time.time()
        if identity is None:
            return
        fields = {**self._request_fields(identity, spec), **session_fields(record),
                  **getattr(record, "extra", {}), **getattr(record, "started_extra", {})}
        self._emit(schema.make_event(getattr(record, "started_event", schema.STARTED),
                                     **fields))
        if self.metrics:
            self.metrics.active.inc()
            self.metrics.setup.observe(time.monotonic() - received)
        if spec.interactive and self.recordings is not None:
            meta = {"session_id": record.id, "user": identity.user, "namespace":
                    fields["namespace"], "instance": fields["instance"], "target": spec.target,
                    "argv": fields["argv"], "started": record.started}
            # Without a TTY the input is the session (what the shell was told): keep it.
            record.tap = self.recordings.recorder(record.id, meta, spec.width, spec.height,
                                                  spec.term, keystrokes=True if not spec.tty
                                                  else None)

    def ended(self, record: Any, exc: BaseException | None) -> None:
        """The session is over: `ended` with an exit status, else `failed` with the reason."""
        identity, spec, _ = self._requests.pop(record.id, (None, None, 0.0))
        if identity is None:
            return
        duration = round(time.time() - record.started, 3)
        fields = {**self._request_fields(identity, spec), **session_fields(record),
                  **getattr(record, "extra", {}),
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
