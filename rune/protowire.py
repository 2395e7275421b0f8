"""The few protobuf wire facts the data paths use to skip protobuf for bulk bytes.

A response that is only (an optional instance_id and) one bytes field is, on the wire,
that field's tag, its length as a varint and the bytes. The apiserver writes output and
download chunks that way with one copy instead of protobuf's two (into the message, then
out as the serialization), and the CLI reads them as a view into what gRPC received
(cli/wire.py). Everything else goes through protobuf on both sides.
"""

from __future__ import annotations

from collections.abc import Callable

# Length-delimited (wire type 2) tags: (field number << 3) | 2.
INSTANCE_ID_TAG = 0x0A  # CopyResponse.instance_id (field 1)
EXEC_STDOUT_TAG = 0x12  # ExecResponse.stdout (field 2)
EXEC_STDERR_TAG = 0x1A  # ExecResponse.stderr (field 3)
COPY_DATA_TAG = 0x22  # CopyResponse.data (field 4)
COPY_REQUEST_DATA_TAG = 0x1A  # CopyRequest.data (field 3)


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


class BytesMessage:
    """Such a message as its reader takes a protobuf one: WhichOneof, the instance and
    the data, a view into the received bytes."""

    __slots__ = ("kind", "instance_id", "data")

    def __init__(self, kind: str, instance_id: str, data: memoryview) -> None:
        self.kind = kind
        self.instance_id = instance_id
        self.data = data

    def WhichOneof(self, group: str) -> str:  # noqa: N802 - protobuf's name
        return self.kind


def view_parser(message_type: type, kinds: dict[int, str], with_id: bool
                ) -> Callable[[bytes], object]:
    """A deserializer: a BytesMessage for a message of only one of these fields (by tag),
    else message_type.FromString."""
    tags = frozenset(kinds)
    parse = message_type.FromString

    def parser(raw: bytes) -> object:
        found = bytes_field_view(raw, tags, with_id)
        if found is None:
            return parse(raw)
        return BytesMessage(kinds[found[0]], found[1], found[2])

    return parser


def passing(serialize: Callable[[object], bytes] | None) -> Callable[[object], bytes]:
    """A serializer that sends bytes as they are (encode_bytes_field's) and serializes
    anything else as before."""
    def serializer(message: object) -> bytes:
        if type(message) is bytes:
            return message
        return serialize(message) if serialize is not None else message

    return serializer
