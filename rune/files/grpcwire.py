"""Entries (rune/files/entries.py) and packs (rune/files/pack.py) as the gRPC messages
of CopyService, both ways."""

from __future__ import annotations

from typing import Any

from rune.proto import exec_pb2 as pb


def header_pb(header: dict[str, Any]) -> pb.FileHeader:
    return pb.FileHeader(path=header.get("path", ""), kind=header.get("kind", ""),
                         size=int(header.get("size", 0)), mode=int(header.get("mode", 0)),
                         mtime=float(header.get("mtime", 0.0)),
                         link_target=header.get("target", ""))


def header_dict(header: pb.FileHeader) -> dict[str, Any]:
    return {"path": header.path, "kind": header.kind, "size": header.size,
            "mode": header.mode, "mtime": header.mtime, "target": header.link_target}


def end_pb(end: dict[str, Any]) -> pb.FileEnd:
    return pb.FileEnd(size=int(end.get("size", -1)), sha256=str(end.get("sha256", "")),
                      error=str(end.get("error", "") or ""))


def end_dict(end: pb.FileEnd) -> dict[str, Any]:
    out: dict[str, Any] = {"size": end.size, "sha256": end.sha256}
    if end.error:
        out["error"] = end.error
    return out


def done_pb(done: dict[str, Any]) -> pb.CopyDone:
    return pb.CopyDone(files=int(done.get("files", 0)), bytes=int(done.get("bytes", 0)),
                       manifest_sha256=str(done.get("manifest_sha256", "")),
                       failed=int(done.get("failed", 0)))


def pack_pb(entries: list[dict[str, Any]]) -> pb.FilePack:
    return pb.FilePack(entries=[
        pb.PackedEntry(header=header_pb(e), data=e.get("data") or b"",
                       sha256=str(e.get("sha256", ""))) for e in entries])


def pack_entries(pack: pb.FilePack) -> list[dict[str, Any]]:
    """A pack message as entries (rune/files/pack.py); data and digest for files only."""
    out = []
    for e in pack.entries:
        entry = header_dict(e.header)
        if entry["kind"] == "file":
            entry["data"] = e.data
            entry["sha256"] = e.sha256
        elif e.data:
            entry["data"] = e.data  # refused by the receiver's check_pack, not dropped here
        out.append(entry)
    return out
