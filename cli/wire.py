"""Responses whose bulk is one bytes field, read as a view into what gRPC received.

protobuf copies a bytes field into its own message, and reading the field copies it out
again: 1 MiB each way per chunk of output or of a download. A response that is exactly
an optional instance_id and one such field (rune/protowire.py; how the apiserver writes
every data response) is read here as a memoryview; anything else, including anything
odd, is parsed by protobuf itself.
"""

from __future__ import annotations

from collections.abc import Callable

from rune.proto import exec_pb2 as pb
from rune.protowire import COPY_DATA_TAG, EXEC_STDERR_TAG, EXEC_STDOUT_TAG, bytes_field_view

_COPY_TAGS = frozenset((COPY_DATA_TAG,))
_EXEC_TAGS = frozenset((EXEC_STDOUT_TAG, EXEC_STDERR_TAG))
_KINDS = {COPY_DATA_TAG: "data", EXEC_STDOUT_TAG: "stdout", EXEC_STDERR_TAG: "stderr"}


class DataResponse:
    """A data response: what its reader takes of the protobuf message, data as a view."""

    __slots__ = ("kind", "instance_id", "data")

    def __init__(self, kind: str, instance_id: str, data: memoryview) -> None:
        self.kind = kind
        self.instance_id = instance_id
        self.data = data

    def WhichOneof(self, group: str) -> str:  # noqa: N802 - protobuf's name
        return self.kind


def _view(raw: bytes, tags: frozenset[int], with_id: bool) -> DataResponse | None:
    found = bytes_field_view(raw, tags, with_id)
    return None if found is None else DataResponse(_KINDS[found[0]], found[1], found[2])


def parse_copy_response(raw: bytes) -> pb.CopyResponse | DataResponse:
    return _view(raw, _COPY_TAGS, True) or pb.CopyResponse.FromString(raw)


def parse_exec_response(raw: bytes) -> pb.ExecResponse | DataResponse:
    return _view(raw, _EXEC_TAGS, False) or pb.ExecResponse.FromString(raw)


def _stream(channel: object, method: str, serialize: Callable,
            parse: Callable) -> object:
    return channel.stream_stream(method, request_serializer=serialize,
                                 response_deserializer=parse)


def copy_stream(channel: object) -> object:
    """CopyService.StreamCopy with the response parser above."""
    return _stream(channel, "/rune.v1.CopyService/StreamCopy",
                   pb.CopyRequest.SerializeToString, parse_copy_response)


def exec_stream(channel: object) -> object:
    """ExecService.StreamExec with the response parser above."""
    return _stream(channel, "/rune.v1.ExecService/StreamExec",
                   pb.ExecRequest.SerializeToString, parse_exec_response)
