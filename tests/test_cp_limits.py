"""`rune cp` caps from the apiserver's config: files and bytes per copy, both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Rune, start_stack
from test_cp_pack import entry
from test_cp_pack_e2e import upload_packs

SERVICES = [{"name": "api", "namespace": "default", "replicas": 1,
             "command": ["sh", "-c", "exec sleep 2147483647"]}]


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("cp-capped"), agents={"a1": SERVICES},
                        api_extra={"cp": {"limits": {"max_files": 3, "max_bytes": 1000}}})
    yield stack, Rune(stack)
    stack.stop()


def cp(capped, *args: str):
    stack, rune = capped
    return rune("cp", "--api-server", stack.api_address, "--no-progress", *args)


def test_file_count_cap_refuses_the_copy(capped, tmp_path: Path) -> None:
    """A tree with more entries than max_files is refused (255) and leaves no temp file."""
    (tmp_path / "t").mkdir()
    for i in range(5):
        (tmp_path / "t" / f"f{i}").write_text("x")
    there = tmp_path / "there"
    there.mkdir()
    result = cp(capped, "-r", str(tmp_path / "t"), f"api:{there}")
    assert result.returncode == 255 and "more than 3 files" in result.stderr.decode()
    assert not list(there.rglob("*.tmp"))


def test_byte_cap_both_ways(capped, tmp_path: Path) -> None:
    """Past max_bytes an upload and a download are refused; no partial file anywhere."""
    (tmp_path / "big").write_bytes(b"x" * 2000)
    there = tmp_path / "there"
    there.mkdir()
    up = cp(capped, str(tmp_path / "big"), f"api:{there}/")
    assert up.returncode == 255 and "cap of 1000 bytes" in up.stderr.decode()
    assert list(there.iterdir()) == []
    (there / "big").write_bytes(b"y" * 2000)
    back = tmp_path / "back"
    back.mkdir()
    down = cp(capped, f"api:{there}/big", str(back))
    assert down.returncode == 255 and "cap of 1000 bytes" in down.stderr.decode()
    assert list(back.iterdir()) == []
    (tmp_path / "small").write_bytes(b"s" * 10)
    assert cp(capped, str(tmp_path / "small"), f"api:{there}/").returncode == 0


def test_byte_cap_holds_for_packed_small_files(capped, tmp_path: Path) -> None:
    """Small files sent whole in packs count against max_bytes as data does: a client's
    packs past the cap are refused, nothing is written, and the next copy works."""
    stack, _ = capped
    there = tmp_path / "there"
    there.mkdir()
    packs = [[entry("t", kind="dir"), entry("t/a", b"a" * 600)], [entry("t/b", b"b" * 600)]]
    responses = upload_packs(stack, str(there), packs)
    errors = [r.error.message for r in responses if r.WhichOneof("msg") == "error"]
    assert errors and "cap of 1000 bytes" in errors[0], responses
    assert not [p for p in there.rglob("*") if p.is_file()]
    (tmp_path / "small").write_bytes(b"s" * 10)
    assert cp(capped, str(tmp_path / "small"), f"api:{there}/").returncode == 0
