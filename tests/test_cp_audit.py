"""A copy's audit summary, offline: the fields its closing event carries, its one line in
`rune audit` (the real stack's events are checked in tests/test_cp_auth.py)."""

from __future__ import annotations

from rune.apiserver.copy_relay import asked_fields, audit_fields
from rune.cli.audit_cmd import render, row

DIGEST = "3f2a9c1b0d4e5a6b" + "0" * 48


def test_summary_carries_direction_paths_counts_digests_and_outcome() -> None:
    """Done with a failed file: partial; the per-file digests and the manifest are kept."""
    asked = asked_fields("cp-write", ["conf.yaml", "dist"], "/srv/app/")
    fields = audit_fields(asked, {"files": 3, "bytes": 1234, "failed": 1,
                                  "manifest_sha256": DIGEST, "sha256": {"conf.yaml": "ab"}})
    assert fields["direction"] == "upload" and fields["paths"] == ["conf.yaml", "dist"]
    assert fields["dest"] == "/srv/app/" and fields["files"] == 3 and fields["bytes"] == 1234
    assert fields["failed_files"] == 1 and fields["outcome"] == "partial"
    assert fields["sha256"] == {"conf.yaml": "ab"} and fields["manifest_sha256"] == DIGEST


def test_summary_of_a_copy_that_never_finished_says_failed() -> None:
    """Before COPY_DONE the summary is what was asked, nothing moved, outcome failed."""
    fields = audit_fields(asked_fields("cp-read", ["/var/log/app.log"], ""),
                          {"outcome": "failed"})
    assert fields["direction"] == "download" and fields["outcome"] == "failed"
    assert fields["files"] == 0 and fields["bytes"] == 0 and fields["manifest_sha256"] == ""


def test_summary_bounds_what_a_huge_request_puts_in_an_event() -> None:
    """At most 64 paths of 4 KiB each, 1,000 per-file digests."""
    asked = asked_fields("cp-read", ["/p/" + "x" * 9000] * 100, "")
    fields = audit_fields(asked, {"sha256": {str(i): "d" for i in range(5000)}})
    assert len(fields["paths"]) == 64 and all(len(p) == 4096 for p in fields["paths"])
    assert len(fields["sha256"]) == 1000


def _line(event: dict) -> str:
    return render([row(event)])[0]


def test_audit_shows_a_copy_on_one_line() -> None:
    """ended: direction, outcome, files, bytes and the manifest digest's head."""
    event = {"event": "session.ended", "kind": "cp-write", "direction": "upload",
             "files": 3, "bytes": 1258291, "failed_files": 0, "manifest_sha256": DIGEST,
             "argv": ["rune-cp", "cp-write", "conf.yaml", "/srv/app/"], "user": "bob",
             "instance": "api-instance-h1-0", "exit_code": 0}
    line = _line(event)
    assert "upload ok: 3 files, 1.2 MiB, manifest 3f2a9c1b0d4e5a6b" in line
    assert line.endswith("rune-cp cp-write conf.yaml /srv/app/")
    partial = _line({**event, "failed_files": 1, "exit_code": 1})
    assert "upload partial: 3 files (1 failed)" in partial


def test_audit_shows_failed_and_denied_copies_with_their_direction() -> None:
    """failed: what passed before the reason; denied: the direction from argv."""
    failed = _line({"event": "session.failed", "kind": "cp-read", "direction": "download",
                    "files": 2, "bytes": 10, "code": "unavailable", "reason": "agent lost",
                    "argv": ["rune-cp", "cp-read", "/x"]})
    assert "download failed after 2 files, 10 B: unavailable: agent lost" in failed
    denied = _line({"event": "session.denied", "code": "permission_denied",
                    "reason": "no", "argv": ["rune-cp", "cp-write", "x", "/etc/x"]})
    assert "upload denied: permission_denied: no" in denied
    assert "exit 0" in _line({"event": "session.ended", "exit_code": 0, "argv": ["true"]})


def test_audit_escapes_a_hostile_copy_reason() -> None:
    """A reason with control characters cannot move the cursor or forge a row."""
    line = _line({"event": "session.failed", "direction": "upload", "code": "x",
                  "reason": "a\x1b[2J\nforged", "argv": ["rune-cp", "cp-write", "x", "/y"]})
    assert "\x1b" not in line and "\n" not in line
