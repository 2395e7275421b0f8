"""Packs of small files on the real stack: a hostile client's packs over gRPC reach an
agent that writes nothing outside DEST, and the stack copies on afterwards."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import grpc
import pytest
from conftest import Rune
from test_cp_engine import snapshot
from test_cp_pack import entry

from rune.files import grpcwire
from rune.files.pack import MAX_PACK_ENTRIES
from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc

INSTANCE = "api-instance-a1-0"


def upload_packs(stack, dest: str, packs: list[list[dict]],
                 done: bool = True) -> list[pb.CopyResponse]:
    """A client of our own: init, the packs as they are, done; every response. A copy
    the server refuses is sent without done: a write racing the server's end of the call
    would turn its answer into gRPC's "internal error"."""

    async def run() -> list[pb.CopyResponse]:
        async with grpc.aio.insecure_channel(stack.api_address) as channel:
            call = pb_grpc.CopyServiceStub(channel).StreamCopy()
            await call.write(pb.CopyRequest(init=pb.CopyInit(
                target=INSTANCE, namespace="default", kind="cp-write", paths=["t"],
                dest=dest, recursive=True, timeout_seconds=60, accept_pack=True)))
            first = await call.read()
            out = [first]
            assert first.WhichOneof("msg") == "started" and first.accept_pack
            try:
                for entries in packs:
                    await call.write(pb.CopyRequest(pack=grpcwire.pack_pb(entries)))
                if done:
                    await call.write(pb.CopyRequest(done=pb.CopyDone()))
                    await call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # refused mid-stream: the responses say why
            while (response := await call.read()) is not grpc.aio.EOF:
                out.append(response)
                if response.WhichOneof("msg") in ("done", "error"):
                    return out
            return out

    return asyncio.run(run())


@pytest.fixture(scope="module")
def cp(stack):
    r = Rune(stack)
    return lambda *args: r("cp", "--api-server", stack.api_address, "--no-progress", *args,
                           timeout=120)


def test_hostile_packs_write_nothing_outside_dest(stack, cp, tmp_path: Path) -> None:
    """Path tricks, lying sizes and digests, an escaping link: each refused by the agent
    as a file error; the honest files land; nothing outside DEST."""
    dest = tmp_path / "dest"
    dest.mkdir()
    responses = upload_packs(stack, f"{dest}/", [[
        entry("t", kind="dir"),
        entry("t/good", b"good"),
        entry("../escape", b"x"), entry("/abs", b"x"), entry("t/../../up", b"x"),
        entry("t/short", b"hello", size=2), entry("t/long", b"hello", size=9),
        entry("t/damaged", b"hello", sha256=hashlib.sha256(b"other").hexdigest()),
        entry("t/l", kind="symlink", target="/etc"),
        entry("t/l/through", b"x"),
    ], [entry("t/later", b"later")]])
    kinds = [r.WhichOneof("msg") for r in responses]
    assert kinds[-1] == "done" and responses[-1].done.failed == 8, responses
    assert sorted(os.listdir(dest)) == ["t"]
    assert sorted(os.listdir(dest / "t")) == ["good", "later"]
    assert sorted(os.listdir(tmp_path)) == ["dest"]
    (tmp_path / "after").write_text("after\n")
    assert cp(str(tmp_path / "after"), f"{INSTANCE}:{dest}/").returncode == 0


def test_too_many_entries_in_one_pack_is_refused_by_the_server(stack, cp,
                                                               tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    responses = upload_packs(stack, f"{dest}/", [
        [entry("t", kind="dir")] + [entry(f"t/f{i}") for i in range(MAX_PACK_ENTRIES)]],
        done=False)
    last = responses[-1]
    assert last.WhichOneof("msg") == "error" and last.error.code == "invalid_argument"
    assert "pack" in last.error.message
    assert not any(p.name.startswith("f") for p in dest.rglob("*"))
    (tmp_path / "after").write_text("after\n")
    assert cp(str(tmp_path / "after"), f"{INSTANCE}:{dest}/").returncode == 0


def test_many_small_files_round_trip_through_packs(cp, tmp_path: Path) -> None:
    """3,000 small files and a few large ones, up and down, come back identical."""
    src = tmp_path / "src" / "tree"
    for i in range(3000):
        d = src / f"d{i // 300}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(i % 2000))
    (src / "big").write_bytes(os.urandom(3 << 20))
    os.symlink("d0/f1", src / "link")
    remote, back = tmp_path / "remote", tmp_path / "back"
    remote.mkdir()
    back.mkdir()
    assert cp("-r", str(src), f"{INSTANCE}:{remote}/").returncode == 0
    assert cp("-r", f"{INSTANCE}:{remote}/tree", f"{back}/").returncode == 0
    assert snapshot(back / "tree") == snapshot(src)
    assert not list(back.rglob("*.rune-*.tmp")) and not list(remote.rglob("*.rune-*.tmp"))
