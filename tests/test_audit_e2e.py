"""Audit events end to end: real sessions, read back from the stream and via `rune audit`."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
import uuid

import nats
from nats.js.api import AckPolicy, ConsumerConfig

from tests.conftest import ROOT


def stream_events(nats_url: str, subject: str = "rune.audit.>", **connect) -> list[dict]:
    """Every audit event now in the RUNE_AUDIT stream on `subject`, in stream order
    (`connect`: credentials such as nkeys_seed= and inbox_prefix= on a locked broker)."""

    async def read() -> list[dict]:
        nc = await nats.connect(nats_url, **connect)
        try:
            js = nc.jetstream()
            sub = await js.pull_subscribe(subject, stream="RUNE_AUDIT",
                                          config=ConsumerConfig(ack_policy=AckPolicy.NONE))
            pending = (await sub.consumer_info()).num_pending
            events = []
            while pending:
                for msg in await sub.fetch(256, timeout=5):
                    pending = msg.metadata.num_pending
                    events.append({**json.loads(msg.data), "_subject": msg.subject})
            return events
        finally:
            await nc.close()

    return asyncio.run(read())


def wait_events(stack, match: dict, until_event: str, timeout: float = 20) -> list[dict]:
    """The events whose fields equal `match`, once one of kind `until_event` is stored."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in stream_events(stack.nats_url)
                 if all(e.get(k) == v for k, v in match.items())]
        if any(e["event"] == until_event for e in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def session_id_of(stderr: bytes) -> str:
    match = re.search(rb"session ([0-9a-f]{32}) on instance", stderr)
    assert match, stderr
    return match.group(1).decode()


def test_success_emits_started_and_ended(rune, stack):
    """A session that exits produces exactly started then ended, with every documented field."""
    result = rune("exec", "-v", "--workdir", "/tmp", "-e", "SECRET_KEY=hunter2-value", "api",
                  "sh", "-c", "echo hi; exit 3")
    assert result.returncode == 3
    sid = session_id_of(result.stderr)
    events = wait_events(stack, {"session_id": sid}, "session.ended")
    assert [e["event"] for e in events] == ["session.started", "session.ended"]
    started, ended = events
    for event in events:
        assert event["version"] == 1
        assert event["source"] == "apiserver"
        assert event["user"] == "anonymous" and event["groups"] == []
        assert event["namespace"] == "default" and event["target"] == "api"
        assert event["instance"].startswith("api-instance-a1-")
        assert event["agent"] == "a1" and event["host"].endswith("-a1")
        assert event["argv"] == ["sh", "-c", "echo hi; exit 3"]
        assert event["tty"] is False and event["workdir"] == "/tmp"
        assert event["env_keys"] == ["SECRET_KEY"]
        assert "hunter2" not in json.dumps(event), "an env value leaked into the audit trail"
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", event["time"])
    assert started["_subject"] == "rune.audit.default.session.started"
    assert ended["_subject"] == "rune.audit.default.session.ended"
    assert ended["exit_code"] == 3 and ended["signal"] == 0
    assert ended["bytes_out"] == 3 and ended["bytes_in"] == 0
    assert 0 < ended["duration"] < 60


def test_signal_death_is_in_the_ended_event(rune, stack):
    """A command killed by a signal ends with that signal in the event."""
    result = rune("exec", "-v", "api", "sh", "-c", "kill -9 $$")
    assert result.returncode == 137
    events = wait_events(stack, {"session_id": session_id_of(result.stderr)}, "session.ended")
    assert [e["event"] for e in events] == ["session.started", "session.ended"]
    assert events[1]["signal"] == 9


def test_not_found_target_is_one_denial(rune, stack):
    """A target that does not exist produces exactly one denied event with the reason."""
    target = f"nope-{uuid.uuid4().hex[:8]}"
    assert rune("exec", "-e", "TOKEN=s3cr3t", target, "true").returncode == 255
    events = wait_events(stack, {"target": target}, "session.denied")
    assert [e["event"] for e in events] == ["session.denied"]
    denied = events[0]
    assert denied["_subject"] == "rune.audit.default.session.denied"
    assert denied["code"] == "not_found"
    assert target in denied["reason"]
    assert denied["user"] == "anonymous" and denied["argv"] == ["true"]
    assert denied["env_keys"] == ["TOKEN"] and "s3cr3t" not in json.dumps(denied)
    assert "session_id" not in denied


def test_bad_namespace_is_denied_on_a_safe_subject(rune, stack):
    """A namespace that cannot be a subject token still gets audited, under '_invalid'."""
    target = f"t{uuid.uuid4().hex[:8]}"
    assert rune("exec", "-n", "a.b.>", target, "true").returncode == 255
    events = wait_events(stack, {"target": target}, "session.denied")
    assert [e["event"] for e in events] == ["session.denied"]
    assert events[0]["namespace"] == "a.b.>"
    assert events[0]["_subject"] == "rune.audit._invalid.session.denied"


def test_timeout_is_started_then_failed(rune, stack):
    """A session that ends without an exit status produces started then failed, no ended."""
    result = rune("exec", "-v", "--timeout", "1s", "api", "sleep", "30")
    assert result.returncode == 124
    events = wait_events(stack, {"session_id": session_id_of(result.stderr)}, "session.failed")
    assert [e["event"] for e in events] == ["session.started", "session.failed"]
    failed = events[1]
    assert failed["code"] == "deadline_exceeded"
    assert "timed out" in failed["reason"]
    assert failed["stage"] == "running"
    assert "exit_code" not in failed


def test_rune_audit_json_and_filters(rune, stack):
    """`rune audit --json` prints one event per line; --user, -n and --since filter."""
    result = rune("exec", "-v", "api", "true")
    sid = session_id_of(result.stderr)
    wait_events(stack, {"session_id": sid}, "session.ended")
    api = ("--api-server", stack.api_address)
    out = rune.bare("audit", *api, "--json", "--since", "1h", "--user", "anonymous")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert [e["event"] for e in events if e.get("session_id") == sid] == [
        "session.started", "session.ended"]
    assert rune.bare("audit", *api, "--json", "--user", "nobody-else").stdout == b""
    prod = rune.bare("audit", *api, "--json", "-n", "prod").stdout.decode()
    assert sid not in prod
    everything = rune.bare("audit", *api, "--json", "-A").stdout.decode()
    assert sid in everything


def test_rune_audit_table(rune, stack):
    """Without --json `rune audit` prints an aligned table with the result of each event."""
    result = rune("exec", "-v", "api", "sh", "-c", "exit 4")
    wait_events(stack, {"session_id": session_id_of(result.stderr)}, "session.ended")
    out = rune.bare("audit", "--api-server", stack.api_address)
    lines = out.stdout.decode().splitlines()
    assert lines[0].split() == ["TIME", "EVENT", "USER", "NAMESPACE", "INSTANCE", "RESULT",
                                "COMMAND"]
    assert any("ended" in line and "exit 4" in line and 'sh -c "exit 4"' in line
               for line in lines)


def test_rune_audit_follow_sees_new_events(rune, stack):
    """`rune audit --follow` prints events of sessions that start after it."""
    proc = subprocess.Popen([sys.executable, "-m", "rune.cli.main", "audit", "--api-server",
                             stack.api_address, "--follow", "--json", "--since", "1s"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=rune.env)
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: lines.extend(
        json.loads(line) for line in proc.stdout), daemon=True)
    reader.start()
    try:
        marker = f"follow-{uuid.uuid4().hex[:8]}"
        assert rune("exec", "api", "echo", marker).returncode == 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
                e["event"] == "session.ended" and marker in e["argv"] for e in list(lines)):
            time.sleep(0.05)
        assert [e["event"] for e in list(lines) if marker in e.get("argv", [])] == [
            "session.started", "session.ended"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_example_dashboard_prints_live_and_stored_events(rune, stack):
    """examples/audit_dashboard.py shows a session's events live, and from history."""
    argv = [sys.executable, "examples/audit_dashboard.py", "--server", stack.nats_url,
            "--max-events", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout.readline().startswith(b"listening on rune.audit.>")
        marker = f"dash-{uuid.uuid4().hex[:8]}"
        assert rune("exec", "api", "sh", "-c", f"echo {marker}; exit 2").returncode == 2
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = out.decode().splitlines()
    assert "started" in lines[0] and marker in lines[0]
    assert "ended" in lines[1] and marker in lines[1] and "exit 2" in lines[1]
    assert lines[2] == "totals: session.ended=1, session.started=1"
    history = subprocess.run([*argv, "--history", "1h"], capture_output=True, timeout=30,
                             cwd=ROOT)
    assert history.returncode == 0, history.stderr
    stored = history.stdout.decode().splitlines()
    assert len(stored) == 4 and all(re.match(r"^\d{4}-", line) for line in stored[1:3])


def test_verbose_prints_the_path_and_timings(rune):
    """`rune exec --verbose` says on stderr how the TTY was chosen, where it ran, and timings."""
    result = rune("exec", "--verbose", "api", "true")
    lines = result.stderr.decode().splitlines()
    assert lines[0].startswith("rune: tty off:")
    assert re.match(r"rune: api server .*, namespace default, target api$", lines[1])
    assert re.match(r"rune: session [0-9a-f]{32} on instance api-instance-a1-\d \(agent a1, "
                    r"host .*, runner process\) in \d+\.\d ms$", lines[2])
    assert re.match(r"rune: remote exit code 0, signal 0, after \d+\.\d ms$", lines[3])
    assert result.stdout == b""
