"""Data responses written and read without protobuf are the bytes protobuf writes and
reads (rune/protowire.py, apiserver/wire.py, cli/wire.py)."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from rune.cli.wire import parse_copy_response, parse_exec_response

from rune.proto import exec_pb2 as pb
from rune.protowire import (
    COPY_DATA_TAG,
    EXEC_STDERR_TAG,
    EXEC_STDOUT_TAG,
    BytesMessage,
    encode_bytes_field,
    read_varint,
    varint,
)

SIZES = [0, 1, 127, 128, 16383, 16384, 1020 * 1024]


@pytest.mark.parametrize("size", SIZES)
def test_exec_output_encodes_as_protobuf_does(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert encode_bytes_field(EXEC_STDOUT_TAG, data) == \
        pb.ExecResponse(stdout=data).SerializeToString()
    assert encode_bytes_field(EXEC_STDERR_TAG, memoryview(data)) == \
        pb.ExecResponse(stderr=data).SerializeToString()


@pytest.mark.parametrize("instance", ["", "api-instance-h1-0", "ünïcode-instance-x"])
def test_copy_data_encodes_as_protobuf_does(instance: str) -> None:
    data = b"\x00\xff" * 700
    assert encode_bytes_field(COPY_DATA_TAG, data, instance) == \
        pb.CopyResponse(instance_id=instance, data=data).SerializeToString()


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**21, 2**35, 2**63])
def test_varints_round_trip(value: int) -> None:
    raw = varint(value)
    assert read_varint(raw, 0) == (value, len(raw))


@pytest.mark.parametrize("response", [
    pb.ExecResponse(stdout=b"hello\n"), pb.ExecResponse(stderr=bytes(200_000)),
    pb.ExecResponse(stdout=b""), pb.ExecResponse(exit=pb.Exit(code=3, signal=0)),
    pb.ExecResponse(started=pb.Started(session_id="s")), pb.ExecResponse(),
    pb.ExecResponse(error=pb.Error(code="x", message="y")),
])
def test_cli_reads_exec_output_as_views_and_the_rest_as_protobuf(response) -> None:
    raw = response.SerializeToString()
    got = parse_exec_response(raw)
    kind = response.WhichOneof("msg")
    assert got.WhichOneof("msg") == kind
    if kind in ("stdout", "stderr"):
        assert type(got) is BytesMessage and bytes(got.data) == getattr(response, kind)
    else:
        assert got == response


ODD_EXEC = [b"\x12\x05abc", b"\x12\xff\xff", b"\x12\x01a\x12\x01b", b"\x12\x01a\x1a\x01b",
            b"\x12", b"\x1a\x80"]
ODD_COPY = [b"\x22\x05abc", b"\x22\xff\xff", b"\x0a\x02\xff\xfe\x22\x00", b"\x22\x01a\x22\x01b"]


@pytest.mark.parametrize("message, parse, raw",
                         [(pb.ExecResponse, parse_exec_response, r) for r in ODD_EXEC]
                         + [(pb.CopyResponse, parse_copy_response, r) for r in ODD_COPY])
def test_cli_reads_odd_responses_as_protobuf_does(message, parse, raw: bytes) -> None:
    """Cut short, lying lengths, repeated or mixed fields, bad UTF-8: protobuf decides."""
    try:
        want = message.FromString(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse(raw)
        return
    got = parse(raw)
    kind = want.WhichOneof("msg")
    assert got.WhichOneof("msg") == kind
    assert bytes(got.data if type(got) is BytesMessage else getattr(got, kind)) == \
        getattr(want, kind)
    if message is pb.CopyResponse:
        assert got.instance_id == want.instance_id


def test_copy_parse_keeps_its_instance() -> None:
    raw = pb.CopyResponse(instance_id="a-instance-b-0", data=b"xyz").SerializeToString()
    got = parse_copy_response(raw)
    assert type(got) is BytesMessage and got.instance_id == "a-instance-b-0"
    assert bytes(got.data) == b"xyz"


@pytest.mark.parametrize("request_", [
    pb.CopyRequest(data=b"chunk" * 1000), pb.CopyRequest(data=b""),
    pb.CopyRequest(header=pb.FileHeader(path="a", kind="file", size=3)),
    pb.CopyRequest(done=pb.CopyDone()), pb.CopyRequest(),
])
def test_apiserver_reads_upload_data_as_views_and_the_rest_as_protobuf(request_) -> None:
    """An upload's data request, pre-encoded by the CLI, is what protobuf writes; the
    apiserver reads it as a view and every other request through protobuf."""
    from rune.apiserver.wire import COPY_PARSERS

    from rune.protowire import COPY_REQUEST_DATA_TAG

    raw = request_.SerializeToString()
    got = COPY_PARSERS["StreamCopy"](raw)
    if request_.WhichOneof("msg") == "data":
        assert encode_bytes_field(COPY_REQUEST_DATA_TAG, request_.data) == raw
        assert type(got) is BytesMessage and bytes(got.data) == request_.data
        assert got.WhichOneof("msg") == "data"
    else:
        assert got == request_
