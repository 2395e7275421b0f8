"""The multiplexer's message encoding: round trips, and what a malformed message gets."""

from __future__ import annotations

import pytest
from rune.cli import muxwire


def _body(message: dict) -> bytes:
    return muxwire.encode(message)[muxwire.HEADER.size:]


def test_messages_round_trip_with_every_kind_of_value():
    hello = {"t": "hello", "version": "0.1.0+1a.2b.3", "argv": ["exec", "api", "sh", "-c", ""],
             "cwd": "/srv/ü", "env": {"HOME": "/root", "RUNE_X": "a=b;c:d"},
             "n": -15, "started": 1764640000.25, "ok": True, "no": False, "none": None}
    assert muxwire.decode(_body(hello)) == hello


def test_words_that_are_not_utf8_come_through_unchanged():
    word = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")  # as os.environ holds them
    assert muxwire.decode(_body({"t": "hello", "argv": [word]}))["argv"] == [word]


def test_reader_splits_a_stream_fed_a_byte_at_a_time():
    stream = muxwire.encode({"t": "signal", "n": 2}) + muxwire.encode({"t": "exit", "code": 0})
    reader, got = muxwire.Reader(), []
    for i in range(len(stream)):
        got += reader.feed(stream[i:i + 1])
    assert got == [{"t": "signal", "n": 2}, {"t": "exit", "code": 0}]


@pytest.mark.parametrize("body", [
    b"", b"d", b"d1:", b"d1:s1:t", b"d9999999999:", b"d1:i1;s1:x", b"l1:N", b"s5:ab",
    b"d1:s1:ti12x;", b"d1:s1:ti--1;", b"d1:s1:ti" + b"9" * 40 + b";", b"d1:s1:tX",
    b"d-1:", b"d 1:", b"d1:s1:tN" + b"trailing", b"d1:s1:tf1.0", b"d1:s1:tfnotanumber;",
    b"l1:l1:l1:l1:l1:l1:N",  # deeper than any message
])
def test_malformed_bodies_are_refused_with_a_clear_error(body):
    with pytest.raises(ValueError):
        muxwire.decode(body)


def test_a_message_that_is_not_a_mapping_is_refused():
    with pytest.raises(ValueError, match="mapping"):
        muxwire.decode(b"l0:")


def test_an_oversized_length_is_refused_before_it_is_buffered():
    with pytest.raises(ValueError, match="too large"):
        muxwire.Reader().feed(muxwire.HEADER.pack(muxwire.MAX_MESSAGE + 1))


def test_what_cannot_be_sent_is_refused():
    with pytest.raises(TypeError):
        muxwire.encode({"t": "hello", "fds": object()})
    with pytest.raises(ValueError, match="too large"):
        muxwire.encode({"t": "hello", "argv": ["x" * muxwire.MAX_MESSAGE]})
