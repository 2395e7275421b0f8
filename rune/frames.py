"""The msgpack frame codec of the apiserver <-> agent leg (hot path: no pydantic here).

A frame is the msgpack array ``[kind, seq, payload]``. Sequenced kinds carry a
per-direction sequence number starting at 1; ACK and HEARTBEAT carry 0.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

# agent -> apiserver
STDOUT = 1
STDERR = 2
EXIT = 3  # payload {"code": int, "signal": int}
ERROR = 4  # payload {"code": str, "message": str}
# apiserver -> agent
STDIN = 10
STDIN_EOF = 11
RESIZE = 12  # payload [width, height]
SIGNAL = 13  # payload signal number
CLOSE = 14  # payload reason; the agent kills the command and ends the session
# file copy, either direction (rune/files/entries.py): a tree as entries, then a summary
FILE_HEADER = 30  # payload {"path", "kind", "size", "mode", "mtime", "target"}
FILE_DATA = 31  # payload bytes of the current file
FILE_END = 32  # payload {"size": int, "sha256": hex}
FILE_ERROR = 33  # payload {"path": str, "message": str}: one file not copied
COPY_DONE = 34  # payload {"files", "bytes", "manifest_sha256", ...}: the stream is complete
FILE_PACK = 35  # payload [entry, ...]: small files whole, dirs, symlinks (rune/files/pack.py)
# both directions, unsequenced
ACK = 20  # payload: highest contiguous sequence number consumed
HEARTBEAT = 21  # payload: highest contiguous sequence number received

NAMES = {
    STDOUT: "stdout", STDERR: "stderr", EXIT: "exit", ERROR: "error", STDIN: "stdin",
    STDIN_EOF: "stdin_eof", RESIZE: "resize", SIGNAL: "signal", CLOSE: "close",
    ACK: "ack", HEARTBEAT: "heartbeat", FILE_HEADER: "file_header", FILE_DATA: "file_data",
    FILE_END: "file_end", FILE_ERROR: "file_error", COPY_DONE: "copy_done",
    FILE_PACK: "file_pack",
}
DATA_KINDS = frozenset((STDOUT, STDERR, STDIN, FILE_DATA))

# Data frames stay well under NATS max_payload (1 MiB by default).
MAX_DATA = 1020 * 1024
MAX_FRAME = 1024 * 1024


class MalformedFrame(ValueError):
    """The bytes are not a frame of this protocol."""


_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack
# msgpack's unsigned int and bin headers: marker byte -> (struct of what follows, its size)
_UINTS = {0xcc: struct.Struct(">B"), 0xcd: struct.Struct(">H"), 0xce: struct.Struct(">I"),
          0xcf: struct.Struct(">Q")}
_BINS = {0xc4: struct.Struct(">B"), 0xc5: struct.Struct(">H"), 0xc6: struct.Struct(">I")}


def encode(kind: int, seq: int, payload: Any = None) -> bytes:
    return _packb((kind, seq, payload))


def data_header(kind: int, seq: int, size: int) -> bytes:
    """The first bytes of encode(kind, seq, payload) for a bytes payload of `size`.

    Header and payload go out as two buffers (and are stored so for retransmission):
    the payload is never copied into a frame. The bytes on the wire are the same
    msgpack array encode() writes."""
    if size < 0x100:
        bin_header = b"\xc4" + size.to_bytes(1, "big")
    elif size < 0x10000:
        bin_header = b"\xc5" + size.to_bytes(2, "big")
    else:
        bin_header = b"\xc6" + size.to_bytes(4, "big")
    return b"\x93" + _packb(kind) + _packb(seq) + bin_header


def _decode_data(data: bytes | bytearray) -> tuple[int, int, bytes] | None:
    """A data frame's fields read from its header, no msgpack object built; None for
    anything else (which the full decoder then accepts or refuses)."""
    if len(data) < 5 or data[0] != 0x93 or data[1] not in DATA_KINDS:
        return None
    pos, marker = 3, data[2]
    if marker < 0x80:
        seq = marker
    elif marker in _UINTS:
        unpack = _UINTS[marker]
        if len(data) < pos + unpack.size:
            return None
        seq = unpack.unpack_from(data, pos)[0]
        pos += unpack.size
    else:
        return None
    if len(data) <= pos or data[pos] not in _BINS:
        return None
    unpack = _BINS[data[pos]]
    start = pos + 1 + unpack.size
    if len(data) < start or unpack.unpack_from(data, pos + 1)[0] != len(data) - start:
        return None  # cut short or with trailing bytes: the full decoder says which
    if len(data) - start > MAX_DATA:
        raise MalformedFrame(f"{NAMES[data[1]]} frame of {len(data) - start} bytes "
                             f"exceeds {MAX_DATA}")
    if type(data) is bytes:
        return data[1], seq, data[start:]
    with memoryview(data) as view:  # a frame read in place (rune/natsread.py): one copy
        return data[1], seq, view[start:].tobytes()


def decode(data: bytes | bytearray) -> tuple[int, int, Any]:
    if len(data) > MAX_FRAME:
        raise MalformedFrame(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    fast = _decode_data(data)
    if fast is not None:
        return fast
    try:
        frame = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedFrame(f"undecodable frame ({type(exc).__name__}: {exc})") from None
    if not isinstance(frame, list) or len(frame) != 3:
        raise MalformedFrame("frame is not a [kind, seq, payload] array")
    kind, seq, payload = frame
    if kind not in NAMES or not isinstance(seq, int) or seq < 0:
        raise MalformedFrame(f"unknown frame kind {kind!r} or bad sequence {seq!r}")
    if kind in DATA_KINDS and not isinstance(payload, bytes):
        raise MalformedFrame(f"{NAMES[kind]} frame without bytes payload")
    if kind in DATA_KINDS and len(payload) > MAX_DATA:
        raise MalformedFrame(f"{NAMES[kind]} frame of {len(payload)} bytes exceeds {MAX_DATA}")
    return kind, seq, payload


def pack(obj: Any) -> bytes:
    """Encodes a control message (session open request/reply) as msgpack."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise MalformedFrame(f"undecodable message: {exc}") from None
