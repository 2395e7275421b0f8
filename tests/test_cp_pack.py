"""Small files packed many to a message: the sender's packing, and a receiver that trusts
no pack (oversized, lying sizes and digests, too many entries, path tricks inside)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from test_cp_engine import copy, make_tree, snapshot

from rune import frames
from rune.files import grpcwire
from rune.files.entries import CopyLimits, Header
from rune.files.pack import (
    MAX_PACK_BYTES,
    MAX_PACK_ENTRIES,
    PACK_BYTES,
    PACK_ENTRIES,
    SMALL_FILE,
    PackRefused,
    check_pack,
    pack_cost,
    pack_events,
    split_pack,
)
from rune.files.safepath import SafeRoot
from rune.files.writer import CapExceeded, CopyAborted, TreeWriter
from rune.proto import exec_pb2 as pb


def entry(path: str, data: bytes = b"", kind: str = "file", **over) -> dict:
    e = {"path": path, "kind": kind, "size": len(data), "mode": 0o644, "mtime": 0.0,
         "target": ""}
    if kind == "file":
        e.update(data=data, sha256=hashlib.sha256(data).hexdigest())
    e.update(over)
    return e


def write_packs(dst: Path, packs: list[object], dest: str = "/",
                limits: CopyLimits | None = None) -> list[str]:
    root = SafeRoot.at(str(dst))
    writer = TreeWriter(root, dest, multiple=True, limits=limits)
    try:
        for pack in packs:
            writer.pack(pack)
        writer.finish()
    finally:
        writer.close()
        root.close()
    return [str(e) for e in writer.errors]


def listing(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


# --- the sender ------------------------------------------------------------------------

def reader_events(files: dict[str, bytes], failing: str = "") -> list:
    events: list = [("header", Header("t", "dir", 0, 0o755, 0.0))]
    for name, data in files.items():
        events.append(("header", Header(f"t/{name}", "file", len(data), 0o644, 0.0)))
        if name == failing:
            events += [("end", {"size": -1, "sha256": "", "error": "EIO"}),
                       ("error", object())]
            continue
        for i in range(0, max(len(data), 1), 1020 * 1024):
            if data[i:i + 1020 * 1024]:
                events.append(("data", data[i:i + 1020 * 1024]))
        events.append(("end", {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    return events


def test_small_files_and_dirs_are_packed_large_ones_pass_through() -> None:
    """One pack carries the dir and the small files whole; a large file keeps its three
    kinds of message, in tree order."""
    big = os.urandom(SMALL_FILE + 1)
    out = list(pack_events(iter(reader_events({"a": b"aa", "empty": b"", "big": big,
                                               "z": b"zz"}))))
    kinds = [k for k, _ in out]
    assert kinds == ["pack", "header", "data", "end", "pack"]
    first, last = out[0][1], out[-1][1]
    assert [e["path"] for e in first] == ["t", "t/a", "t/empty"]
    assert first[1]["data"] == b"aa" and first[1]["sha256"] == hashlib.sha256(b"aa").hexdigest()
    assert first[2]["data"] == b"" and first[2]["size"] == 0
    assert "data" not in first[0]
    assert [e["path"] for e in last] == ["t/z"]


def test_a_file_that_failed_to_read_is_not_packed_and_its_error_passes() -> None:
    out = list(pack_events(iter(reader_events({"a": b"a", "bad": b"bbb", "c": b"c"},
                                              failing="bad"))))
    assert [k for k, _ in out] == ["pack", "error", "pack"]
    assert [e["path"] for e in out[0][1]] == ["t", "t/a"]
    assert [e["path"] for e in out[2][1]] == ["t/c"]


def test_packs_stay_under_their_caps_and_fit_one_frame() -> None:
    many = {f"f{i:05d}": os.urandom(200 * 1024 if i % 7 == 0 else 10)
            for i in range(3000)}
    packs = [p for k, p in pack_events(iter(reader_events(many))) if k == "pack"]
    assert sum(len(p) for p in packs) == 3001
    for p in packs:
        assert len(p) <= PACK_ENTRIES and pack_cost(p) <= PACK_BYTES
        assert len(frames.encode(frames.FILE_PACK, 1 << 40, p)) <= frames.MAX_FRAME


def test_split_pack_recuts_a_clients_pack_and_refuses_an_entry_too_large() -> None:
    entries = [entry(f"t/f{i}", os.urandom(300 * 1024)) for i in range(10)]
    parts = list(split_pack(entries))
    assert [e for p in parts for e in p] == entries
    assert all(pack_cost(p) <= PACK_BYTES for p in parts)
    with pytest.raises(PackRefused):
        list(split_pack([entry("t/huge", os.urandom(PACK_BYTES))]))


def test_pack_survives_the_grpc_message_both_ways() -> None:
    entries = [entry("t", kind="dir"), entry("t/a", b"\0\1"),
               entry("t/l", kind="symlink", target="a")]
    back = grpcwire.pack_entries(grpcwire.pack_pb(entries))
    assert back == entries


def test_round_trip_through_packs_is_identical(tmp_path: Path) -> None:
    """Nested dirs, empty files, symlinks, unicode names, modes, a large file among small."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    make_tree(src / "tree")
    for i in range(500):
        (src / "tree" / "a" / f"small-{i}").write_bytes(os.urandom(i))
    sent, got, errors = copy(src, ["tree"], dst, "/", pack=True)
    assert errors == []
    assert snapshot(dst / "tree") == snapshot(src / "tree")
    assert sent.digest() == got.digest() and got.files == sent.files
    assert not list(dst.rglob("*.rune-*.tmp"))


# --- a receiver that trusts no pack ----------------------------------------------------

def test_good_pack_is_written(tmp_path: Path) -> None:
    errors = write_packs(tmp_path, [[entry("t", kind="dir"), entry("t/a", b"hello"),
                                     entry("t/l", kind="symlink", target="a")]])
    assert errors == []
    assert (tmp_path / "t" / "a").read_bytes() == b"hello"
    assert os.readlink(tmp_path / "t" / "l") == "a"


@pytest.mark.parametrize("bad, why", [
    (entry("t/a", b"hello", size=3), "declared size"),
    (entry("t/a", b"hello", size=9), "size mismatch"),
    (entry("t/a", b"hello", sha256=hashlib.sha256(b"other").hexdigest()), "SHA-256"),
    (entry("t/a", b"hello", size=-1), "size mismatch"),
])
def test_lying_sizes_and_digests_fail_that_file_only(tmp_path: Path, bad: dict,
                                                     why: str) -> None:
    errors = write_packs(tmp_path, [[entry("t", kind="dir"), bad, entry("t/b", b"ok")]])
    assert len(errors) == 1 and why in errors[0]
    assert listing(tmp_path) == ["t", "t/b"]  # no partial, no temporary file


@pytest.mark.parametrize("path", ["/etc/evil", "../evil", "t/../../evil", "t//x", "t/./x",
                                  "t/\0x", "x" * 300, "/".join(["d"] * 200)])
def test_path_tricks_inside_a_pack_are_refused(tmp_path: Path, path: str) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    errors = write_packs(dst, [[entry("t", kind="dir"), entry(path, b"x"),
                                entry("t/ok", b"ok")]])
    assert len(errors) == 1
    assert listing(dst) == ["t", "t/ok"]
    assert listing(tmp_path) == ["dst", "dst/t", "dst/t/ok"]


@pytest.mark.parametrize("target", ["/etc", "../..", "../../etc/passwd", "x/../../.."])
def test_escaping_symlink_in_a_pack_is_refused_and_never_written_through(
        tmp_path: Path, target: str) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    errors = write_packs(dst, [[entry("t", kind="dir"),
                                entry("t/l", kind="symlink", target=target),
                                entry("t/l/x", b"through")]])
    assert errors and all("t/l" in e for e in errors)
    assert listing(dst) == ["t"]


@pytest.mark.parametrize("pack, why", [
    ({"not": "a list"}, "malformed pack"),
    ([], "malformed pack"),
    ([["a", "list"]], "malformed entry"),
    ([{**entry("t", kind="dir"), "data": b"x"}], "directory or symlink"),
    ([{**entry("t/a", b"x"), "data": "text"}], "not bytes"),
    ([{**entry("t/a", b"x"), "sha256": None}], "SHA-256"),
    ([entry(f"t/f{i}") for i in range(MAX_PACK_ENTRIES + 1)], "entries"),
    ([entry(f"t/f{i}", bytes(1024 * 1024)) for i in range(5)], "bytes of data"),
])
def test_malformed_or_oversized_packs_stop_the_copy(tmp_path: Path, pack: object,
                                                    why: str) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(CopyAborted, match=why):
        write_packs(dst, [[entry("t", kind="dir")], pack])
    assert not list(dst.rglob("*.rune-*.tmp")) and not (dst / "t" / "a").exists()
    assert len(check_pack([entry("t/a", bytes(MAX_PACK_BYTES))])) == 1  # at the cap: fine


def test_caps_count_packed_files_and_bytes(tmp_path: Path) -> None:
    with pytest.raises(CapExceeded):
        write_packs(tmp_path, [[entry(f"f{i}", b"x") for i in range(11)]],
                    limits=CopyLimits(max_files=10))
    with pytest.raises(CapExceeded):
        write_packs(tmp_path, [[entry(f"g{i}", bytes(100)) for i in range(11)]],
                    limits=CopyLimits(max_bytes=1000))
    assert not list(tmp_path.rglob("*"))


def test_stdout_sink_takes_one_packed_file_and_refuses_more(tmp_path: Path) -> None:
    from rune.cli.cp_stream import StdoutSink

    async def run(pack: list) -> StdoutSink:
        sink = StdoutSink()
        read, write = os.pipe()
        saved = os.dup(1)
        os.dup2(write, 1)
        try:
            await sink.apply("pack", pack)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(write)
            sink.out = os.read(read, 1 << 16)
            os.close(read)
        return sink

    sink = asyncio.run(run([entry("a", b"payload")]))
    assert sink.out == b"payload" and sink.new_errors() == []
    sink = asyncio.run(run([entry("a", b"payload", sha256="0" * 64)]))
    assert sink.new_errors()
    from rune.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        asyncio.run(run([entry("a", b"1"), entry("b", b"2")]))


@pytest.mark.parametrize("response", [
    pb.CopyResponse(data=b"chunk" * 1000),
    pb.CopyResponse(instance_id="api-instance-h1-0", data=bytes(range(256)) * 300),
    pb.CopyResponse(data=b""),
    pb.CopyResponse(instance_id="x", header=pb.FileHeader(path="a", kind="file", size=3)),
    pb.CopyResponse(done=pb.CopyDone(files=2)),
    pb.CopyResponse(pack=grpcwire.pack_pb([entry("t/a", b"a")])),
])
def test_cli_reads_data_responses_as_views_and_the_rest_as_protobuf(response) -> None:
    from rune.cli.wire import parse_copy_response as parse_response

    raw = response.SerializeToString()
    got = parse_response(raw)
    assert got.WhichOneof("msg") == response.WhichOneof("msg")
    assert got.instance_id == response.instance_id
    if response.WhichOneof("msg") == "data":
        assert bytes(got.data) == response.data
    else:
        assert got == response


@pytest.mark.parametrize("payload, why", [
    ("nope", "malformed pack"),
    ([entry(f"t/f{i}") for i in range(MAX_PACK_ENTRIES + 1)], "entries"),
    ([entry(f"t/f{i}", bytes(1024 * 1024)) for i in range(5)], "bytes of data"),
    ([entry("t/a", b"x", size="3")], "bad size"),
])
def test_apiserver_refuses_a_hostile_agents_pack(payload: object, why: str) -> None:
    from rune.apiserver.copy_relay import _agent_pack

    from rune.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=why):
        _agent_pack(payload)


class _Link:
    def __init__(self) -> None:
        self.sent: list[tuple[int, object, int]] = []

    async def send(self, kind: int, payload: object = None, size: int = 0) -> None:
        self.sent.append((kind, payload, size))


def _kind(agent_packs: bool):
    from rune.apiserver.copy_relay import CopyKind, audit_fields

    kind = CopyKind.__new__(CopyKind)
    kind.agent_packs = agent_packs
    kind.summary = audit_fields({}, {})
    return kind


def test_apiserver_recuts_packs_for_the_agent_and_counts_what_passed() -> None:
    entries = [entry("t", kind="dir")] + [entry(f"t/f{i}", os.urandom(200 * 1024))
                                          for i in range(12)]
    kind, link = _kind(True), _Link()
    asyncio.run(kind._feed_pack(link, entries))
    assert {k for k, _, _ in link.sent} == {frames.FILE_PACK} and len(link.sent) > 1
    assert [e for _, p, _ in link.sent for e in p] == entries
    assert all(0 < size <= PACK_BYTES for _, _, size in link.sent)
    assert kind.summary["files"] == 12 and kind.summary["bytes"] == 12 * 200 * 1024


def test_apiserver_unpacks_for_an_agent_that_takes_no_packs() -> None:
    """An agent that did not say `packs` on open gets header, data, end per file."""
    kind, link = _kind(False), _Link()
    asyncio.run(kind._feed_pack(link, [entry("t", kind="dir"), entry("t/a", b"abc"),
                                       entry("t/e")]))
    assert [k for k, _, _ in link.sent] == [
        frames.FILE_HEADER, frames.FILE_HEADER, frames.FILE_DATA, frames.FILE_END,
        frames.FILE_HEADER, frames.FILE_END]
    assert link.sent[2][1] == b"abc"
    assert link.sent[3][1] == {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}
    assert kind.summary["files"] == 2
