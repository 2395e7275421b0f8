"""The CLI's streams whose bulk is one bytes field, read as views, written pre-encoded.

protobuf copies a bytes field into its own message, and reading the field copies it out
again: 1 MiB each way per chunk of output, of a download or of an upload. A message that
is exactly an optional instance_id and one such field (rune/protowire.py; how the
apiserver writes every data response) is read as a memoryview; anything else, including
anything odd, is parsed by protobuf itself. An upload's data is sent pre-encoded.
"""

from __future__ import annotations

from rune.proto import exec_pb2 as pb
from rune.protowire import (
    COPY_DATA_TAG,
    EXEC_STDERR_TAG,
    EXEC_STDOUT_TAG,
    passing,
    view_parser,
)

parse_copy_response = view_parser(pb.CopyResponse, {COPY_DATA_TAG: "data"}, True)
parse_exec_response = view_parser(
    pb.ExecResponse, {EXEC_STDOUT_TAG: "stdout", EXEC_STDERR_TAG: "stderr"}, False)


def copy_stream(channel: object) -> object:
    """CopyService.StreamCopy: responses parsed as above, pre-encoded requests passed."""
    return channel.stream_stream("/rune.v1.CopyService/StreamCopy",
                                 request_serializer=passing(pb.CopyRequest.SerializeToString),
                                 response_deserializer=parse_copy_response)


def exec_stream(channel: object) -> object:
    """ExecService.StreamExec with the response parser above."""
    return channel.stream_stream("/rune.v1.ExecService/StreamExec",
                                 request_serializer=pb.ExecRequest.SerializeToString,
                                 response_deserializer=parse_exec_response)
