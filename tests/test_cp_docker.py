"""`rune cp` into and out of real containers: no tar, sh or cat needed inside them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import DOCKER_IMAGE, SLEEP_FOREVER, Rune
from rune.cli.devstack import wait_until
from test_cp_engine import make_tree, snapshot

pytestmark = pytest.mark.docker


def container(engine, name: str, user: str = "") -> tuple[str, str]:
    """A labelled busybox container stripped of tar, sh, cat and ls; (id, instance id)."""
    instance = f"box-instance-{name}-{engine.run_id}".replace(".", "-")
    created = engine.client.create_container(
        DOCKER_IMAGE, SLEEP_FOREVER, user=user or None,
        labels={**engine.labels, "rune.namespace": "default", "rune.service": "box",
                "rune.instance": instance},
        host_config=engine.client.create_host_config(network_mode="none"))
    cid = created["Id"]
    engine.client.start(cid)
    strip = engine.client.exec_create(cid, ["/bin/busybox", "rm", "-f", "/bin/tar",
                                            "/bin/cat", "/bin/sh", "/bin/ls"], user="0")
    engine.client.exec_start(strip["Id"])
    return cid, instance


def read_inside(engine, cid: str, path: str) -> bytes:
    pid = engine.client.inspect_container(cid)["State"]["Pid"]
    return Path(f"/proc/{pid}/root{path}").read_bytes()


@pytest.fixture(scope="module")
def cp(docker_stack):
    r = Rune(docker_stack)

    def run(*args: str, input: bytes | None = None):
        return r("cp", "--api-server", docker_stack.api_address, "--no-progress", *args,
                 input=input, timeout=120)

    return run


@pytest.fixture(scope="module")
def box(docker_stack, docker_engine):
    cid, instance = container(docker_engine, "root")
    wait_until(lambda: Rune(docker_stack)("instances").stdout.decode().count(instance),
               "box adopted")
    return cid, instance


def test_upload_and_download_without_tar(cp, box, docker_engine, tmp_path: Path) -> None:
    """A tree goes into a container that has no tar, sh or cat, and comes back identical."""
    cid, instance = box
    make_tree(tmp_path / "tree")
    result = cp("-r", str(tmp_path / "tree"), f"{instance}:/tmp")
    assert result.returncode == 0, result.stderr
    assert read_inside(docker_engine, cid, "/tmp/tree/a/b/c/deep.txt") == b"deep\n"
    back = tmp_path / "back"
    back.mkdir()
    result = cp("-r", f"{instance}:/tmp/tree", str(back))
    assert result.returncode == 0, result.stderr
    assert snapshot(back / "tree") == snapshot(tmp_path / "tree")


def test_paths_stay_inside_the_container(cp, box, docker_engine, tmp_path: Path) -> None:
    """A link to / inside the container resolves to the container's root, never the host's;
    reading /etc/hostname reads the container's."""
    cid, instance = box
    ln = docker_engine.client.exec_create(cid, ["/bin/busybox", "ln", "-sf", "/",
                                                "/escape"])
    docker_engine.client.exec_start(ln["Id"])
    marker = f"rune-cp-host-{docker_engine.run_id}"
    (tmp_path / "x").write_text("inside\n")
    result = cp(str(tmp_path / "x"), f"{instance}:/escape/tmp/{marker}")
    assert result.returncode == 0, result.stderr
    assert not Path(f"/tmp/{marker}").exists()
    assert read_inside(docker_engine, cid, f"/tmp/{marker}") == b"inside\n"
    got = cp(f"{instance}:/escape/../../etc/hostname", "-")
    assert got.returncode == 255 and "'..' is not allowed" in got.stderr.decode()
    got = cp(f"{instance}:/etc/hostname", "-")
    assert got.returncode == 0
    assert got.stdout == read_inside(docker_engine, cid, "/etc/hostname")


def test_container_user_owns_what_it_writes(cp, docker_stack, docker_engine,
                                            tmp_path: Path) -> None:
    """A container running as 1000:1000 gets files owned by 1000, and cannot write where
    that user cannot (exit 1, one Error line)."""
    cid, instance = container(docker_engine, "user", user="1000:1000")
    wait_until(lambda: instance in Rune(docker_stack)("instances").stdout.decode(),
               "user box adopted")
    (tmp_path / "f").write_text("mine\n")
    result = cp(str(tmp_path / "f"), f"{instance}:/tmp/f")
    assert result.returncode == 0, result.stderr
    pid = docker_engine.client.inspect_container(cid)["State"]["Pid"]
    st = os.stat(f"/proc/{pid}/root/tmp/f")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    denied = cp(str(tmp_path / "f"), f"{instance}:/etc/f")
    assert denied.returncode == 1 and "Permission denied" in denied.stderr.decode()
    assert not os.path.exists(f"/proc/{pid}/root/etc/f")
