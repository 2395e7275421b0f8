"""`rune cp` end to end on the process stack: real nats-server, apiserver, agent, CLI."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from conftest import Rune
from test_cp_engine import make_tree, snapshot


@pytest.fixture(scope="module")
def cp(stack):
    r = Rune(stack)

    def run(*args: str, input: bytes | None = None, timeout: float = 120):
        return r("cp", "--api-server", stack.api_address, "--no-progress", *args,
                 input=input, timeout=timeout)

    return run


@pytest.fixture(scope="module")
def instance(stack) -> str:
    return "api-instance-a1-0"


def remote(tmp_path: Path, name: str) -> Path:
    """A fresh directory on this host that the process instances can see as well."""
    path = tmp_path / name
    path.mkdir()
    return path


def test_file_up_and_down_identical(cp, instance, tmp_path: Path) -> None:
    """A random file uploaded then downloaded comes back byte for byte, mode kept."""
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(5 * 1024 * 1024 + 3))
    src.chmod(0o640)
    there = remote(tmp_path, "there")
    up = cp(str(src), f"{instance}:{there}/")
    assert up.returncode == 0, up.stderr
    assert (there / "blob.bin").read_bytes() == src.read_bytes()
    assert (there / "blob.bin").stat().st_mode & 0o777 == 0o640
    back = remote(tmp_path, "back")
    down = cp(f"{instance}:{there}/blob.bin", str(back / "copy.bin"))
    assert down.returncode == 0, down.stderr
    assert hashlib.sha256((back / "copy.bin").read_bytes()).digest() == \
        hashlib.sha256(src.read_bytes()).digest()


def test_tree_round_trip(cp, instance, tmp_path: Path) -> None:
    """A tree with nested dirs, empty files, symlinks, unicode names and modes round-trips."""
    make_tree(tmp_path / "tree")
    there = remote(tmp_path, "there")
    assert cp("-r", str(tmp_path / "tree"), f"api:{there}").returncode == 0
    back = remote(tmp_path, "back")
    result = cp("-r", f"{instance}:{there}/tree", str(back))
    assert result.returncode == 0, result.stderr
    assert snapshot(back / "tree") == snapshot(tmp_path / "tree")


def test_stdin_and_stdout(cp, instance, tmp_path: Path) -> None:
    """`-` as SRC reads stdin into one remote file; `-` as DEST writes it to stdout."""
    there = remote(tmp_path, "there")
    assert cp("-", f"{instance}:{there}/from-stdin.txt", input=b"piped\n").returncode == 0
    assert (there / "from-stdin.txt").read_bytes() == b"piped\n"
    result = cp(f"{instance}:{there}/from-stdin.txt", "-")
    assert result.returncode == 0 and result.stdout == b"piped\n"


def test_cp_semantics_and_exit_codes(cp, instance, tmp_path: Path) -> None:
    """A directory needs -r (exit 1, one Error line); a missing file is exit 1; bad flags 2."""
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("f")
    there = remote(tmp_path, "there")
    result = cp(str(tmp_path / "d"), str(tmp_path / "f"), f"{instance}:{there}")
    assert result.returncode == 1
    assert result.stderr.decode().count("Error:") == 1 and "-r" in result.stderr.decode()
    assert (there / "f").read_text() == "f"
    missing = cp(f"{instance}:{there}/nope", str(tmp_path / "x"))
    assert missing.returncode == 1 and "No such file" in missing.stderr.decode()
    assert cp(str(tmp_path / "f"), str(tmp_path / "g")).returncode == 2
    assert cp("--timeout", "soon", str(tmp_path / "f"), f"{instance}:{there}").returncode == 2
    gone = cp(str(tmp_path / "f"), f"nosuch:{there}")
    assert gone.returncode == 255 and "not found" in gone.stderr.decode()


def test_traversal_in_remote_path_refused(cp, instance, tmp_path: Path) -> None:
    """`rune cp x api:../../etc/x` is refused with a clear error; nothing written."""
    (tmp_path / "x").write_text("x")
    result = cp(str(tmp_path / "x"), "api:../../etc/x")
    assert result.returncode == 255
    assert "'..' is not allowed" in result.stderr.decode()
    assert not Path("/etc/x").exists()


def test_local_destination_symlink_refused(cp, instance, tmp_path: Path) -> None:
    """A download whose local DEST is a symlink to /etc is refused, nothing written."""
    there = remote(tmp_path, "there")
    (there / "passwd").write_text("evil\n")
    os.symlink("/etc", tmp_path / "link")
    before = Path("/etc/passwd").read_bytes()
    result = cp(f"{instance}:{there}/passwd", str(tmp_path / "link"))
    assert result.returncode == 1 and "symlink" in result.stderr.decode()
    assert Path("/etc/passwd").read_bytes() == before


def test_fanout_upload_and_download(cp, tmp_path: Path) -> None:
    """--all uploads to every instance (summary table); a download from many writes
    DEST/<instance-id>/."""
    (tmp_path / "fix.sh").write_text("echo fixed\n")
    there = remote(tmp_path, "there")
    result = cp("--all", str(tmp_path / "fix.sh"), f"api:{there}/")
    assert result.returncode == 0, result.stderr
    summary = result.stderr.decode()
    assert "api-instance-a1-0" in summary and "api-instance-a1-1" in summary
    out = tmp_path / "out"
    result = cp("--all", f"api:{there}/fix.sh", str(out))
    assert result.returncode == 0, result.stderr
    for i in (0, 1):
        assert (out / f"api-instance-a1-{i}" / "fix.sh").read_text() == "echo fixed\n"


@pytest.mark.parametrize("target", ["/", "../..", "/etc"])
def test_remote_tree_with_escaping_symlink_refused(cp, instance, tmp_path: Path,
                                                   target: str) -> None:
    """A remote tree whose symlink points to / or ../..: the link is refused with one
    Error line (exit 1), the rest of the tree arrives, nothing is written through it."""
    there = remote(tmp_path, "there")
    (there / "t").mkdir()
    (there / "t" / "ok").write_text("ok\n")
    os.symlink(target, there / "t" / "evil")
    back = remote(tmp_path, "back")
    result = cp("-r", f"{instance}:{there}/t", str(back))
    assert result.returncode == 1
    errors = [line for line in result.stderr.decode().splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "t/evil" in errors[0] and target in errors[0]
    assert (back / "t" / "ok").read_text() == "ok\n"
    assert not os.path.lexists(back / "t" / "evil")


def test_dereference_copies_what_links_point_to(cp, instance, tmp_path: Path) -> None:
    """-L follows symlinks: a link to a file arrives as that file's content."""
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "real").write_text("real\n")
    os.symlink("real", tmp_path / "t" / "link")
    there = remote(tmp_path, "there")
    assert cp("-r", "-L", str(tmp_path / "t"), f"{instance}:{there}").returncode == 0
    assert not (there / "t" / "link").is_symlink()
    assert (there / "t" / "link").read_text() == "real\n"
    plain = remote(tmp_path, "plain")
    assert cp("-r", str(tmp_path / "t"), f"{instance}:{plain}").returncode == 0
    assert os.readlink(plain / "t" / "link") == "real"


def test_progress_on_request(stack, instance, tmp_path: Path) -> None:
    """--progress draws bytes, rate and ETA on stderr (rich) and changes nothing else."""
    src = tmp_path / "p.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    there = remote(tmp_path, "there")
    result = Rune(stack, env={"COLUMNS": "120"})(
        "cp", "--api-server", stack.api_address, "--progress", str(src),
        f"{instance}:{there}/")
    assert result.returncode == 0, result.stderr
    assert b"Error" not in result.stderr
    assert (there / "p.bin").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("request_body", [
    {"kind": "cp-write", "session_id": "s1", "namespace": "default",
     "instance_id": "api-instance-a1-0", "dest": "../../etc/x"},
    {"kind": "cp-read", "session_id": "s2", "namespace": "default",
     "instance_id": "api-instance-a1-0", "paths": []},
    {"kind": "cp-read", "session_id": "bad id\n", "namespace": "default",
     "instance_id": "api-instance-a1-0", "paths": ["/etc/hosts"]},
    {"kind": "cp-write", "session_id": "s3", "namespace": "default",
     "instance_id": "api-instance-a1-0", "dest": "/tmp/x", "chown": "root"},
    {"kind": "cp-read", "session_id": "s4", "namespace": "default",
     "instance_id": "api-instance-a1-0", "paths": ["a\0b"]},
])
def test_agent_refuses_malformed_copy_requests(stack, cp, instance, tmp_path: Path,
                                               request_body: dict) -> None:
    """The agent checks a copy request itself: a bad one gets an error reply, no session,
    and the agent goes on copying."""
    import asyncio

    import nats

    from rune import frames

    async def ask() -> dict:
        nc = await nats.connect(stack.nats_url, connect_timeout=5, max_reconnect_attempts=0)
        try:
            reply = await nc.request("rune.agent.a1.exec", frames.pack(request_body),
                                     timeout=10)
            return frames.unpack(reply.data)
        finally:
            await nc.close()

    reply = asyncio.run(ask())
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_argument"
    (tmp_path / "after").write_text("after\n")
    assert cp(str(tmp_path / "after"), f"{instance}:{tmp_path}/after2").returncode == 0


def test_fanout_partial_failure_exit_and_summary(stack, cp, tmp_path: Path) -> None:
    """A relative path is the instance's own working dir: a file that only one instance
    has is fetched from it, the other reports one Error line; exit 1, both in the table."""
    workdir = stack.state_dir / "agents" / "a1" / "instances" / "api-instance-a1-0"
    (workdir / "only-here.txt").write_text("here\n")
    try:
        out = tmp_path / "out"
        result = cp("--all", "api:only-here.txt", str(out))
        assert result.returncode == 1, result.stderr
        err = result.stderr.decode()
        assert (out / "api-instance-a1-0" / "only-here.txt").read_text() == "here\n"
        assert not (out / "api-instance-a1-1" / "only-here.txt").exists()
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and errors[0].startswith("Error: api-instance-a1-1: ")
        assert "2 instances" in err
    finally:
        (workdir / "only-here.txt").unlink()
