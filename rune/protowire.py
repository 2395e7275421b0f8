"""The few protobuf wire facts the data paths use to skip protobuf for bulk bytes.

A response that is only (an optional instance_id and) one bytes field is, on the wire,
that field's tag, its length as a varint and the bytes. The apiserver writes output and
download chunks that way with one copy instead of protobuf's two (into the message, then
out as the serialization), and the CLI reads them as a view into what gRPC received
(cli/wire.py). Everything else goes through protobuf on both sides.
"""

from __future__ import annotations

# Length-delimited (wire type 2) tags: (field number << 3) | 2.
INSTANCE_ID_TAG = 0x0A  # CopyResponse.instance_id (field 1)
EXEC_STDOUT_TAG = 0x12  # ExecResponse.stdout (field 2)
EXEC_STDERR_TAG = 0x1A  # ExecResponse.stderr (field 3)
COPY_DATA_TAG = 0x22  # CopyResponse.data (field 4)


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(raw: bytes, at: int) -> tuple[int, int]:
    """The varint at `at` and the offset after it; ValueError if cut short or too long."""
    value, shift = 0, 0
    for i in range(at, min(at + 10, len(raw))):
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise ValueError("truncated varint")


def encode_bytes_field(tag: int, data: bytes | memoryview, instance_id: str = "") -> bytes:
    """The serialization protobuf gives a message holding only these fields (an empty
    instance_id is left out, as protobuf does)."""
    head = varint(len(data))
    if instance_id:
        name = instance_id.encode()
        return b"".join((bytes((INSTANCE_ID_TAG,)), varint(len(name)), name,
                         bytes((tag,)), head, data))
    return b"".join((bytes((tag,)), head, data))


def bytes_field_view(raw: bytes, tags: frozenset[int], with_id: bool
                     ) -> tuple[int, str, memoryview] | None:
    """(tag, instance_id, data view) when RAW is exactly such a message; else None."""
    try:
        at, instance = 0, ""
        if with_id and raw[:1] == b"\x0a":
            size, at = read_varint(raw, 1)
            instance = raw[at:at + size].decode("utf-8")
            at += size
        if at < len(raw) and raw[at] in tags:
            size, start = read_varint(raw, at + 1)
            if start + size == len(raw):
                return raw[at], instance, memoryview(raw)[start:]
    except (ValueError, UnicodeDecodeError):
        pass
    return None
