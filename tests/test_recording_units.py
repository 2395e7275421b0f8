"""asciicast v2 recording and replay, without a network (a store that keeps what it gets)."""

from __future__ import annotations

import json
import os
import tempfile

from rune.apiserver.recording import (
    EVENT,
    FLUSH_BYTES,
    PIECE,
    RAW_CHUNK,
    RAW_PIECE,
    CastText,
    Recorder,
    Recordings,
    RecordingSettings,
)
from rune.cli.sessions_cmd import cast_events, play


class MemoryStore:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.metas: list[dict] = []

    def publish_data(self, session_id: str, data: bytes) -> None:
        self.chunks.append(data)

    def cast(self) -> bytes:
        """The asciicast text a replay reads, made from the stored chunks."""
        text = CastText()
        return b"".join(text.lines(chunk) for chunk in self.chunks) + text.end()

    def publish_meta(self, session_id: str, meta: dict) -> None:
        self.metas.append(meta)


META = {"session_id": "s1", "user": "ann", "namespace": "default", "instance": "api-instance-0",
        "target": "api", "argv": ["sh"], "started": 1700000000.0}


def recorder(keystrokes: bool = False) -> tuple[MemoryStore, Recorder]:
    store = MemoryStore()
    return store, Recorder(store, "s1", META, 100, 30, "xterm-256color", keystrokes)


def replayed(cast: bytes) -> bytes:
    """What `rune sessions replay` writes, captured in a file."""
    _, events = cast_events(cast.decode())
    with tempfile.TemporaryFile() as out:
        play(events, speed=1.0, idle_limit=None, out=out.fileno(), sleep=lambda s: None)
        out.seek(0)
        return out.read()


def test_output_bytes_survive_exactly():
    """Split UTF-8 sequences, invalid bytes and escapes replay as the very same bytes."""
    chunks = [b"h\xc3", b"\xa9llo \xff\xfe", b"\x1b[31mred\x1b[0m\r\n", "€".encode()[:2],
              "€".encode()[2:] + b"\x00end"]
    store, rec = recorder()
    for chunk in chunks:
        rec.output(chunk)
    rec.close({"exit_code": 0, "signal": 0, "duration": 1.0})
    assert replayed(store.cast()) == b"".join(chunks)
    assert store.metas[-1]["state"] == "complete" and store.metas[-1]["bytes"] == sum(
        map(len, chunks))


def test_header_and_resizes_follow_asciicast_v2():
    """The first line is a v2 header; resizes are 'r' events of WxH."""
    store, rec = recorder()
    rec.output(b"$ ")
    rec.resize(120, 40)
    rec.close({})
    header, events = cast_events(store.cast().decode())
    assert header["version"] == 2 and header["width"] == 100 and header["height"] == 30
    assert header["timestamp"] == 1700000000 and header["env"]["TERM"] == "xterm-256color"
    assert [(code, data) for _, code, data in events] == [("o", "$ "), ("r", "120x40")]
    times = [t for t, _, _ in events]
    assert times == sorted(times) and all(t >= 0 for t in times)
    assert store.metas[0]["state"] == "recording"


def test_keystrokes_only_when_configured():
    """Input is left out by default and recorded as 'i' events when enabled."""
    store, rec = recorder()
    rec.input(b"secret\r")
    rec.close({})
    assert all(code != "i" for _, code, _ in cast_events(store.cast().decode())[1])
    store, rec = recorder(keystrokes=True)
    rec.input(b"ls\r")
    rec.close({})
    assert ("i", "ls\r") in [(c, d) for _, c, d in cast_events(store.cast().decode())[1]]
    assert RecordingSettings().keystrokes is False


def test_large_output_is_split_into_small_events_and_chunks():
    """One huge read becomes several events and chunks, each far under NATS max_payload."""
    sizes: list[int] = []

    class Sizing(MemoryStore):
        def publish_data(self, session_id: str, data: bytes) -> None:
            sizes.append(len(data))
            super().publish_data(session_id, data)

    store = Sizing()
    rec = Recorder(store, "s1", META, 80, 24, "xterm", False)
    blob = bytes(range(256)) * 4096  # 1 MiB (a whole frame), mostly escaped in JSON
    rec.output(blob)
    rec.close({})
    assert replayed(store.cast()) == blob
    largest = FLUSH_BYTES + RAW_PIECE + EVENT.size + len(RAW_CHUNK)
    assert len(sizes) > 1 and max(sizes) <= largest < 1 << 20  # NATS max_payload
    assert sum(1 for line in store.cast().decode().splitlines()[1:]
               if len(json.loads(line)[2]) <= PIECE) > 1


def test_binary_output_is_stored_as_it_came():
    """A byte of output costs a byte of the stream (plus a small header per event), not the
    six of a JSON escape: the bulk stream of a TTY session is not held up by its record."""
    store, rec = recorder()
    blob = bytes(1 << 20)  # NULs: \\u0000 in asciicast text
    for i in range(0, len(blob), 64 << 10):
        rec.output(blob[i:i + (64 << 10)])
    rec.close({})
    assert sum(map(len, store.chunks)) < len(blob) * 1.01 + 4096
    assert replayed(store.cast()) == blob


def test_chunks_stored_as_asciicast_text_still_replay():
    """Recordings kept from before the raw form are read as they were written."""
    text = CastText()
    old = [b'{"version": 2, "width": 80, "height": 24}\n', b'[0.5, "o", "hi\\r\\n"]\n']
    cast = b"".join(text.lines(chunk) for chunk in old) + text.end()
    assert replayed(cast) == b"hi\r\n"


def test_replay_keeps_the_pace_scaled_by_speed():
    """Waits between events are the recorded gaps divided by --speed, capped by idle limit."""
    events = [(0.5, "o", "a"), (2.5, "o", "b"), (2.75, "r", "80x24"), (12.75, "o", "c")]
    waits: list[float] = []
    read_fd, write_fd = os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY)
    try:
        play(events, speed=2.0, idle_limit=None, out=write_fd, sleep=waits.append)
        assert waits == [0.25, 1.0, 0.125, 5.0]
        waits.clear()
        play(events, speed=1.0, idle_limit=1.0, out=write_fd, sleep=waits.append)
        assert waits == [0.5, 1.0, 0.25, 1.0]
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_recording_disabled_gives_no_recorder():
    """With recording off, TTY sessions get no recorder."""
    recordings = Recordings.__new__(Recordings)
    recordings.settings = RecordingSettings(enabled=False)
    assert recordings.recorder("s", META, 80, 24, "xterm") is None
