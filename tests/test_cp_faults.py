"""`rune cp` under faults: nats-server restarted mid-copy, the CLI killed mid-copy, and
a process instance's own user doing the file work."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import Rune, start_stack
from faultkit import kill9, wait_for

HB = 0.5
API = {"heartbeat": HB, "lost_after": 3}
SERVICES = [
    {"name": "api", "namespace": "default", "replicas": 1,
     "command": ["sh", "-c", "exec sleep 2147483647"]},
    {"name": "nob", "namespace": "default", "replicas": 1, "user": "nobody",
     "command": ["sh", "-c", "exec sleep 2147483647"]},
]


@pytest.fixture
def fresh(tmp_path):
    stack = start_stack(tmp_path / "stack", agents={"a1": SERVICES}, api_extra=API)
    yield stack, Rune(stack)
    stack.stop()


def cp_argv(rune: Rune, stack, *args: str) -> list[str]:
    return rune.argv("cp", "--api-server", stack.api_address, "--no-progress", *args)


def random_file(path: Path, mib: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            block = os.urandom(1024 * 1024)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def temp_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob(".*.rune-*.tmp"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def test_nats_restart_during_500mb_copy_loses_nothing(fresh, tmp_path: Path) -> None:
    """nats-server is killed and restarted while 500 MiB are uploaded: the copy completes
    and the file's digest is equal; then it is downloaded across another restart."""
    stack, rune = fresh
    src = tmp_path / "big.bin"
    want = random_file(src, 500)
    there = tmp_path / "there"
    there.mkdir()
    proc = subprocess.Popen(cp_argv(rune, stack, str(src), f"api:{there}/"), env=rune.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: temp_bytes(there) > 50 * 2**20 or proc.poll() is not None, 120,
             "upload flowing")
    assert proc.poll() is None, proc.stderr.read()
    kill9(stack, "nats")
    time.sleep(0.5)
    stack.start_nats()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert sha256_of(there / "big.bin") == want
    back = tmp_path / "back"
    back.mkdir()
    proc = subprocess.Popen(cp_argv(rune, stack, f"api:{there}/big.bin", str(back)),
                            env=rune.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: temp_bytes(back) > 50 * 2**20 or proc.poll() is not None, 120,
             "download flowing")
    kill9(stack, "nats")
    time.sleep(0.5)
    stack.start_nats()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert sha256_of(back / "big.bin") == want
    assert not list(back.glob(".*.tmp")) and not list(there.glob(".*.tmp"))


def test_killed_cli_leaves_no_partial_file(fresh, tmp_path: Path) -> None:
    """The CLI killed mid-upload: the agent discards the temporary file; the old file at
    the destination is untouched; the stack copies again afterwards."""
    stack, rune = fresh
    src = tmp_path / "big.bin"
    random_file(src, 200)
    there = tmp_path / "there"
    there.mkdir()
    (there / "big.bin").write_text("old\n")
    proc = subprocess.Popen(cp_argv(rune, stack, str(src), f"api:{there}/"), env=rune.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: temp_bytes(there) > 10 * 2**20, 120, "upload flowing")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    wait_for(lambda: not list(there.glob(".*.tmp")), 30, "temporary file discarded")
    assert (there / "big.bin").read_text() == "old\n"
    (tmp_path / "small").write_text("small\n")
    again = subprocess.run(cp_argv(rune, stack, str(tmp_path / "small"), f"api:{there}/"),
                           env=rune.env, capture_output=True, timeout=120)
    assert again.returncode == 0, again.stderr


def test_process_instance_user_does_the_file_work(fresh, request) -> None:
    """A service running as `nobody`: what is written belongs to nobody, and a directory
    only root may write is refused with exit 1, as it would be for the instance."""
    stack, rune = fresh
    tmp_path = Path(tempfile.mkdtemp(prefix="rune-cp-user-"))  # pytest's parents are 0700
    request.addfinalizer(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
    tmp_path.chmod(0o755)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0o755)
    (tmp_path / "f").write_text("f\n")
    ok = subprocess.run(cp_argv(rune, stack, str(tmp_path / "f"), f"nob:{open_dir}/"),
                        env=rune.env, capture_output=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (open_dir / "f").stat().st_uid == 65534
    refused = subprocess.run(cp_argv(rune, stack, str(tmp_path / "f"), f"nob:{closed}/"),
                             env=rune.env, capture_output=True, timeout=120)
    assert refused.returncode == 1 and b"Permission denied" in refused.stderr
    assert not (closed / "f").exists()
    (closed / "root-only").write_text("secret\n")
    (closed / "root-only").chmod(0o600)
    read = subprocess.run(cp_argv(rune, stack, f"nob:{closed}/root-only", "-"),
                          env=rune.env, capture_output=True, timeout=120)
    assert read.returncode == 1 and read.stdout == b""
