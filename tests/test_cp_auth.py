"""`rune cp` with auth on: the cp-read / cp-write verbs, cp_paths, --chown, one audit event."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from rune.apiserver.tokens import digest, new_token
from rune.cli.devstack import DEV_USER, Stack, dev_auth, free_port

SLEEP = ["sh", "-c", "exec sleep 2147483647"]
SERVICES = [
    {"name": "api", "namespace": "default", "replicas": 1, "command": SLEEP},
    {"name": "db", "namespace": "prod", "replicas": 1, "command": SLEEP},
]


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp-secure")
    stack = Stack(tmp, nats_port=free_port(), api_port=free_port())
    bob = new_token()
    auth = dev_auth("admin", {})
    auth["roles"]["uploader"] = {"verbs": ["cp-write", "cp-read", "list"],
                                 "namespaces": ["default"],
                                 "cp_paths": {"allow": [str(tmp / "drop")],
                                              "deny": [str(tmp / "drop" / "secret")]}}
    auth["bindings"].append({"role": "uploader", "users": ["bob"]})
    auth["tokens"] = [{"user": "bob", "sha256": digest(bob)}]
    stack.secure(["a1"], admin="admin", auth=auth)
    path = tmp / "tokens" / "bob.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(bob + "\n")
    stack.token_files["bob"] = path
    (tmp / "drop" / "secret").mkdir(parents=True)
    try:
        stack.start_nats()
        stack.start_apiserver()
        stack.start_agent("a1", SERVICES)
    except BaseException:
        stack.stop()
        raise
    yield stack
    stack.stop()


def rune(stack: Stack, user: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUNE_CONFIG": str(stack.state_dir / "no-config.yaml"),
           "RUNE_TOKEN_FILE": str(stack.token_files[user])}
    return subprocess.run([sys.executable, "-m", "rune.cli.main", *args, "--api-server",
                           stack.api_address], capture_output=True, env=env, cwd=ROOT,
                          timeout=120, stdin=subprocess.DEVNULL)


def audit_events(stack: Stack, namespace: str, want: callable, timeout: float = 20) -> list:
    deadline = time.monotonic() + timeout
    while True:
        out = rune(stack, "admin", "audit", "-n", namespace, "--json").stdout.decode()
        events = [json.loads(line) for line in out.splitlines() if line.strip()]
        found = [e for e in events if want(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_dev_without_cp_write_in_prod_is_refused_and_audited(secure, tmp_path: Path) -> None:
    """`dev` may exec in default but has no cp-write in prod: refused (255), nothing
    written, and a session.denied event names the copy."""
    (tmp_path / "x").write_text("x")
    dest = tmp_path / "should-not-exist"
    result = rune(secure, DEV_USER, "cp", "--no-progress", "-n", "prod", str(tmp_path / "x"),
                  f"db:{dest}")
    assert result.returncode == 255
    assert "permission denied" in result.stderr.decode()
    assert 'may not cp-write in namespace "prod"' in result.stderr.decode()
    assert not dest.exists()
    denied = audit_events(secure, "prod", lambda e: e.get("event") == "session.denied"
                          and e.get("argv", [None])[0] == "rune-cp" and e.get("user") == DEV_USER)
    assert denied and denied[0]["argv"] == ["rune-cp", "cp-write", "x", str(dest)]
    assert denied[0]["code"] == "permission_denied"
    # A second refused copy: the audit stream keeps its order, so once its denial is in,
    # anything published for the first copy is in too.
    marker = tmp_path / "marker"
    rune(secure, DEV_USER, "cp", "--no-progress", "-n", "prod", str(tmp_path / "x"),
         f"db:{marker}")
    assert audit_events(secure, "prod",
                        lambda e: e.get("argv") == ["rune-cp", "cp-write", "x", str(marker)])
    argv = ["rune-cp", "cp-write", "x", str(dest)]
    events = audit_events(secure, "prod", lambda e: e.get("argv") == argv)
    assert [e["event"] for e in events] == ["session.denied"]  # audited once, nothing else
    table = rune(secure, "admin", "audit", "-n", "prod").stdout.decode()
    line = next(x for x in table.splitlines() if str(dest) in x)
    assert "upload denied: permission_denied" in line


def test_cp_paths_allow_and_deny(secure) -> None:
    """bob may write below drop/ only, not below drop/secret, and may not --chown."""
    drop = secure.state_dir / "drop"
    src = secure.state_dir / "payload.txt"
    src.write_text("payload\n")
    ok = rune(secure, "bob", "cp", "--no-progress", str(src), f"api:{drop}/")
    assert ok.returncode == 0, ok.stderr
    assert (drop / "payload.txt").read_text() == "payload\n"
    for dest in (f"{drop}/secret/x", "/etc/x", f"{drop}/../x"):
        refused = rune(secure, "bob", "cp", "--no-progress", str(src), f"api:{dest}")
        assert refused.returncode == 255, dest
    assert not (drop / "secret" / "x").exists() and not Path("/etc/x").exists()
    chown = rune(secure, "bob", "cp", "--no-progress", "--chown", "0:0", str(src),
                 f"api:{drop}/c")
    assert chown.returncode == 255 and "--chown is not allowed" in chown.stderr.decode()


def test_one_audit_event_per_copy_with_digests(secure) -> None:
    """A copy is a session like any other (session.started, then one session.ended) and
    its ended event says what moved: files, bytes, each file's SHA-256, a manifest digest."""
    import hashlib

    drop = secure.state_dir / "drop"
    (drop / "audited.bin").write_bytes(b"a" * 1000)
    out = secure.state_dir / "downloaded.bin"
    result = rune(secure, "bob", "cp", "--no-progress", f"api:{drop}/audited.bin", str(out))
    assert result.returncode == 0, result.stderr
    argv = ["rune-cp", "cp-read", f"{drop}/audited.bin"]
    ended = audit_events(secure, "default", lambda e: e.get("event") == "session.ended"
                         and e.get("argv") == argv)
    assert len(ended) == 1
    event = ended[0]
    assert event["user"] == "bob" and event["kind"] == "cp-read" and event["exit_code"] == 0
    assert event["files"] == 1 and event["bytes"] == 1000 and event["outcome"] == "success"
    assert event["direction"] == "download" and event["paths"] == [f"{drop}/audited.bin"]
    assert event["target"] == "api" and event["instance"].startswith("api-instance-")
    assert event["sha256"] == {"audited.bin": hashlib.sha256(b"a" * 1000).hexdigest()}
    assert len(event["manifest_sha256"]) == 64
    same = audit_events(secure, "default", lambda e: e.get("session_id") == event["session_id"])
    assert sorted(e["event"] for e in same) == ["session.ended", "session.started"]
    table = rune(secure, "admin", "audit", "-n", "default").stdout.decode()
    line = next(x for x in table.splitlines() if "ended" in x and f"{drop}/audited.bin" in x)
    assert "rune-cp cp-read" in line
    assert f"download ok: 1 files, 1000 B, manifest {event['manifest_sha256'][:16]}" in line


def test_failed_copy_is_audited_with_what_it_asked(secure) -> None:
    """An upload from stdin that outlives its --timeout fails (255), leaves nothing behind,
    and its one session.failed event says direction, paths, the reason and outcome."""
    drop = secure.state_dir / "drop" / "slow"
    drop.mkdir()
    env = {**os.environ, "RUNE_CONFIG": str(secure.state_dir / "no-config.yaml"),
           "RUNE_TOKEN_FILE": str(secure.token_files["bob"])}
    proc = subprocess.Popen([sys.executable, "-m", "rune.cli.main", "cp", "--no-progress",
                             "--timeout", "2s", "-", f"api:{drop}/never.bin", "--api-server",
                             secure.api_address], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        proc.stdin.write(b"x" * 100_000)
        proc.stdin.flush()
        proc.wait(timeout=60)  # stdin stays open: the copy can only time out
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stderr.close()
    assert proc.returncode == 255, err
    assert "timed out" in err.decode()
    assert os.listdir(drop) == []  # no partial file, no temporary file
    failed = audit_events(secure, "default", lambda e: e.get("event") == "session.failed"
                          and e.get("dest") == f"{drop}/never.bin")
    assert len(failed) == 1
    event = failed[0]
    assert event["direction"] == "upload" and event["kind"] == "cp-write"
    assert event["outcome"] == "failed" and event["code"] == "deadline_exceeded"
    assert event["paths"] == ["-"] and event["user"] == "bob"  # stdin
    table = rune(secure, "admin", "audit", "-n", "default").stdout.decode()
    line = next(x for x in table.splitlines() if "failed" in x and f"{drop}/never.bin" in x)
    assert "upload failed: deadline_exceeded" in line
