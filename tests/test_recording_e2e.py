"""Sessions for operators end to end: TTY recording and replay, listing, and kill."""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid

from tests.test_audit_e2e import session_id_of, wait_events


def _sessions(rune, stack, *args: str) -> list[list[str]]:
    out = rune.bare("sessions", "list", "--api-server", stack.api_address, *args)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert lines[0].split()[:4] == ["SESSION", "STATE", "USER", "NAMESPACE"]
    return [line.split() for line in lines[1:]]


def _wait_recorded(rune, stack, sid: str, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for row in _sessions(rune, stack, "-A"):
            if row[0] == sid and row[1] == "recorded":
                return row
        time.sleep(0.1)
    raise AssertionError(f"session {sid} never listed as recorded")


def test_tty_session_replays_the_bytes_the_user_saw(rune, stack):
    """A recorded TTY session replays byte for byte what the CLI printed."""
    script = ("printf 'h\\303\\251llo \\377 \\033[1mbold\\033[0m\\n'; "
              "head -c 300000 /dev/zero | tr '\\0' 'x'; echo; exit 5")
    result = rune("exec", "-v", "-t", "api", "sh", "-c", script)
    assert result.returncode == 5
    assert len(result.stdout) > 300000
    sid = session_id_of(result.stderr)
    row = _wait_recorded(rune, stack, sid)
    assert row[2] == "anonymous" and row[3] == "default" and "exit" in row
    replay = rune.bare("sessions", "replay", "--api-server", stack.api_address, sid,
                       "--speed", "1000")
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout == result.stdout
    cast = rune.bare("sessions", "replay", "--api-server", stack.api_address, sid, "--cast")
    assert cast.stdout.startswith(b'{"version": 2')


def test_sessions_without_tty_are_not_recorded(rune, stack):
    """Only TTY sessions are recorded; replaying another fails with a clear error."""
    sid = session_id_of(rune("exec", "-v", "api", "true").stderr)
    wait_events(stack, {"session_id": sid}, "session.ended")
    replay = rune.bare("sessions", "replay", "--api-server", stack.api_address, sid)
    assert replay.returncode == 255
    assert replay.stderr.decode().startswith(f"Error: no recording of session {sid}")
    bad = rune.bare("sessions", "replay", "--api-server", stack.api_address, "../x")
    assert bad.returncode == 255


def test_list_shows_an_active_session_and_kill_ends_it(rune, stack):
    """`rune sessions list` shows a live session; `kill` ends it and kills its command."""
    marker = f"rune-kill-{uuid.uuid4().hex[:8]}"
    proc = rune.popen("exec", "-v", "api", "sh", "-c", f"sleep 300; echo {marker}",
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = b""
        deadline = time.monotonic() + 20
        while b"session " not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        sid = session_id_of(line)
        active = [r for r in _sessions(rune, stack) if r[0] == sid]
        assert active and active[0][1] == "active"
        killed = rune.bare("sessions", "kill", "--api-server", stack.api_address, sid,
                           "--reason", "maintenance")
        assert killed.returncode == 0, killed.stderr
        assert proc.wait(timeout=20) == 255
        stderr = proc.stderr.read().decode()
        assert "Error: session ended by anonymous: maintenance" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
    events = wait_events(stack, {"session_id": sid}, "session.failed")
    assert [e["event"] for e in events] == ["session.started", "session.killed",
                                            "session.failed"]
    assert events[1]["reason"] == "maintenance" and events[1]["session_user"] == "anonymous"
    assert events[2]["code"] == "killed"
    assert events[2]["reason"] == "ended by anonymous: maintenance"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(marker):
        time.sleep(0.1)
    assert not _alive(marker), "the killed session's command survived"
    again = rune.bare("sessions", "kill", "--api-server", stack.api_address, sid)
    assert again.returncode == 255 and b"no active session" in again.stderr


def _alive(marker: str, besides: int = 0) -> bool:
    """Whether a process other than this one (and `besides`) has `marker` in its argv."""
    out = subprocess.run(["pgrep", "-f", re.escape(marker)], capture_output=True)
    return any(int(pid) not in (os.getpid(), besides) for pid in out.stdout.split())
