"""Small files as one message each (header, data and digest together), many to a pack.

    pack    [entry, ...]   entry: a header (rune/files/entries.py) and, for a file,
                           "data" (all of it) and "sha256"; dirs and symlinks as bare
                           headers, in tree order

Three messages per small file (header, data, end) cost more than the file on every
leg; a pack carries up to PACK_ENTRIES entries and PACK_BYTES, so it always fits one
NATS frame (frames.MAX_FRAME). Only files up to SMALL_FILE that were read whole are
packed; a larger one, or one that failed to read, travels as before. A receiver trusts
none of it: check_pack bounds the pack again, and each entry then goes through the
same header, size and digest checks as the three-message form (TreeWriter.pack).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

SMALL_FILE = 256 * 1024
PACK_ENTRIES = 1024
PACK_BYTES = 960 * 1024  # data, names and per-entry encoding: under frames.MAX_FRAME
ENTRY_OVERHEAD = 128  # msgpack keys and numbers of one entry, generously
MAX_PACK_ENTRIES = 4096  # received: more in one pack is a broken or hostile peer
MAX_PACK_BYTES = 4 * 1024 * 1024  # received: data in one pack (the gRPC message cap)

Event = tuple[str, Any]


class PackRefused(ValueError):
    """A pack breaks the rules of its shape; the whole copy stops."""


def entry_cost(entry: dict[str, Any]) -> int:
    """What one entry adds to a frame, at most."""
    data = entry.get("data") or b""
    return len(data) + len(str(entry.get("path", "")).encode("utf-8", "surrogateescape")) \
        + len(str(entry.get("target", "")).encode("utf-8", "surrogateescape")) + ENTRY_OVERHEAD


def pack_cost(entries: list[dict[str, Any]]) -> int:
    return sum(entry_cost(e) for e in entries)


def pack_data(entries: list[dict[str, Any]]) -> int:
    return sum(len(e.get("data") or b"") for e in entries)


def check_pack(entries: object) -> list[dict[str, Any]]:
    """The pack's shape: a bounded list of entries, data only in files, as bytes."""
    if not isinstance(entries, list) or not entries:
        raise PackRefused("malformed pack of files")
    if len(entries) > MAX_PACK_ENTRIES:
        raise PackRefused(f"a pack of {len(entries)} entries (at most {MAX_PACK_ENTRIES})")
    total = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise PackRefused("malformed entry in a pack of files")
        data = entry.get("data", b"")
        if not isinstance(data, bytes):
            raise PackRefused("packed file data is not bytes")
        if entry.get("kind") != "file":
            if data:
                raise PackRefused("data packed with a directory or symlink")
            continue
        if not isinstance(entry.get("sha256"), str):
            raise PackRefused("packed file without a SHA-256")
        total += len(data)
        if total > MAX_PACK_BYTES:
            raise PackRefused(f"a pack of more than {MAX_PACK_BYTES} bytes of data")
    return entries


def unpacked(entries: object) -> Iterator[Event]:
    """A peer's pack, checked first (PackRefused), as the three-message form it stands
    for: each entry's header, then for a file its data (when any) and its end."""
    for entry in check_pack(entries):
        yield "header", entry
        if entry.get("kind") != "file":
            continue
        data = entry.get("data") or b""
        if data:
            yield "data", data
        yield "end", {"size": entry.get("size"), "sha256": entry.get("sha256")}


def split_pack(entries: list[dict[str, Any]],
               limit: int = PACK_BYTES) -> Iterator[list[dict[str, Any]]]:
    """The entries in packs that each fit one frame; PackRefused for an entry too large."""
    part: list[dict[str, Any]] = []
    cost = 0
    for entry in entries:
        c = entry_cost(entry)
        if c > limit:
            raise PackRefused(f"a packed entry of {c} bytes (at most {limit})")
        if part and (cost + c > limit or len(part) >= PACK_ENTRIES):
            yield part
            part, cost = [], 0
        part.append(entry)
        cost += c
    if part:
        yield part


def pack_events(events: Iterator[Event]) -> Iterator[Event]:
    """A reader's events (rune/files/reader.py) with runs of small entries folded into
    ("pack", [entry, ...]); everything else passes through as it came."""
    pack: list[dict[str, Any]] = []
    cost = 0
    held: tuple[Any, list[bytes]] | None = None  # a small file being read (Header)

    def add(entry: dict[str, Any]) -> Iterator[Event]:
        nonlocal pack, cost
        c = entry_cost(entry)
        if pack and (cost + c > PACK_BYTES or len(pack) >= PACK_ENTRIES):
            yield "pack", pack
            pack, cost = [], 0
        pack.append(entry)
        cost += c

    def flush() -> Iterator[Event]:
        nonlocal pack, cost
        if pack:
            yield "pack", pack
            pack, cost = [], 0

    for kind, payload in events:
        if held is not None:
            header, chunks = held
            if kind == "data":
                chunks.append(payload)
                continue
            held = None
            if kind == "end":
                if payload.get("error") or payload.get("size", -1) < 0:
                    continue  # unreadable: its error follows, and none of it was sent
                yield from add({**header.wire(), "size": payload["size"],
                                "data": b"".join(chunks), "sha256": payload["sha256"]})
                continue
            # A file cut short without its end: send what came, unpacked, as it came.
            yield from flush()
            yield "header", header
            for chunk in chunks:
                yield "data", chunk
        if kind == "header":
            if payload.kind != "file":
                yield from add(payload.wire())
            elif 0 <= payload.size <= SMALL_FILE:
                held = (payload, [])
            else:
                yield from flush()
                yield kind, payload
            continue
        yield from flush()
        yield kind, payload
    if held is not None:
        yield from flush()
        yield "header", held[0]
        for chunk in held[1]:
            yield "data", chunk
    yield from flush()
