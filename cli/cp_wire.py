"""CopyService responses read without copying file data twice more.

protobuf copies a data message's bytes into its own message, and `.data` copies them out
again: 1 MiB each way per chunk of a download. A response that is exactly an optional
instance_id and one data field (how every data response is serialized) is read here as
a view into the bytes gRPC received; any other response is parsed by protobuf.
"""

from __future__ import annotations

from rune.proto import exec_pb2 as pb

INSTANCE_ID_TAG = 0x0A  # CopyResponse.instance_id: field 1, length-delimited
DATA_TAG = 0x22  # CopyResponse.data: field 4, length-delimited


class DataResponse:
    """A data response: what _handle reads of a pb.CopyResponse, data as a memoryview."""

    __slots__ = ("instance_id", "data")

    def __init__(self, instance_id: str, data: memoryview) -> None:
        self.instance_id = instance_id
        self.data = data

    def WhichOneof(self, group: str) -> str:  # noqa: N802 - protobuf's name
        return "data"


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    for i in range(at, min(at + 10, len(raw))):
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise ValueError("truncated varint")


def parse_response(raw: bytes) -> pb.CopyResponse | DataResponse:
    try:
        at, instance = 0, ""
        if raw[:1] == b"\x0a":
            size, at = _varint(raw, 1)
            instance = raw[at:at + size].decode("utf-8")
            at += size
        if raw[at:at + 1] == b"\x22":
            size, at = _varint(raw, at + 1)
            if at + size == len(raw):
                return DataResponse(instance, memoryview(raw)[at:])
    except (ValueError, UnicodeDecodeError):
        pass
    return pb.CopyResponse.FromString(raw)


def copy_stream(channel: object) -> object:
    """CopyService.StreamCopy with the response parser above."""
    return channel.stream_stream("/rune.v1.CopyService/StreamCopy",
                                 request_serializer=pb.CopyRequest.SerializeToString,
                                 response_deserializer=parse_response)
