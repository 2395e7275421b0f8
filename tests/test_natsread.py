"""The NATS read path (rune/natsread.py): the stream split into lines and messages, big
payloads read in place, every subscriber served as before."""

from __future__ import annotations

import asyncio
import os
import random

import pytest
from nats.errors import ProtocolError
from rune.cli.devstack import Stack, free_port, stop_pid

from rune.natsconn import connect, subscribe_frames
from rune.natsread import DIRECT_READ, MAX_LINE, DirectTransport, Message, _Reader

SIZES = [0, 1, 100, DIRECT_READ - 1, DIRECT_READ, DIRECT_READ + 1, 300_000, 1020 * 1024]


class _FakeTransport:
    def __init__(self) -> None:
        self.closed = False
        self.paused = 0

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.paused -= 1

    def close(self) -> None:
        self.closed = True


def _feed(reader: _Reader, stream: bytes, cuts: list[int]) -> None:
    """What the loop does: fill get_buffer()'s view, then buffer_updated(n)."""
    at = 0
    cut = iter(cuts)
    while at < len(stream) and reader.error is None:
        view = reader.get_buffer(-1)
        n = min(len(view), len(stream) - at, next(cut, len(stream)))
        view[:n] = stream[at:at + n]
        view.release()
        reader.buffer_updated(n)
        at += n


def _stream(payloads: list[bytes]) -> bytes:
    out = [b"INFO {\"x\":1}\r\n"]
    for i, p in enumerate(payloads):
        out.append(b"PING\r\n")
        if i % 3 == 2:
            head = b"NATS/1.0\r\nk: v\r\n\r\n"
            out.append(b"HMSG s.%d 7 reply.x %d %d\r\n" % (i, len(head), len(head) + len(p)))
            out.append(head + p + b"\r\n")
        else:
            out.append(b"MSG s.%d 7 %d\r\n" % (i, len(p)) + p + b"\r\n")
    return b"".join(out)


async def _reader() -> _Reader:
    reader = _Reader()
    reader.connection_made(_FakeTransport())
    return reader


@pytest.mark.parametrize("seed", range(6))
async def test_any_split_of_the_stream_gives_the_same_units(seed: int) -> None:
    """Lines and messages (MSG and HMSG, small and direct) come out whole and in order,
    however the socket cut the bytes."""
    rng = random.Random(seed)
    payloads = [os.urandom(rng.choice(SIZES)) for _ in range(12)]
    reader = await _reader()
    cuts = [rng.choice([1, 2, 7, 1000, 65536, 200_000]) for _ in range(100_000)]
    _feed(reader, _stream(payloads), cuts)
    assert reader.error is None
    units = await reader.take_all()
    assert units[0] == b"INFO {\"x\":1}\r\n"
    messages = [u for u in units if isinstance(u, Message)]
    assert [u for u in units[1:] if not isinstance(u, Message)] == [b"PING\r\n"] * 12
    assert [bytes(m[3]) for m in messages] == payloads
    for i, (sid, subject, reply, payload, headers) in enumerate(messages):
        assert sid == 7 and subject == b"s.%d" % i
        assert (reply, headers) == ((b"reply.x", b"NATS/1.0\r\nk: v\r\n\r\n") if i % 3 == 2
                                    else (b"", None))
        if i % 3 != 2:
            assert type(payload) is (bytearray if len(payload) >= DIRECT_READ else bytes)


@pytest.mark.parametrize("garbage, why", [
    (b"MSG a 1 5\r\nabcdeXX", "CRLF"),                     # payload not followed by CRLF
    (b"MSG a 1 70000\r\n" + b"x" * 70000 + b"!!", "CRLF"),  # the same, read in place
    (b"MSG a 1 99999999999\r\n", "malformed"),             # larger than any payload
    (b"MSG a x 5\r\n", "malformed"),                        # a sid that is no number
    (b"MSG a\r\n", "malformed"),                            # too few words
    (b"HMSG a 1 9 5\r\n", "malformed"),                     # headers larger than the whole
    (b"MSG a 1 -5\r\n", "malformed"),
    (b"X" * (MAX_LINE + 10), "too long"),                   # a line that never ends
])
async def test_hostile_streams_fail_the_connection_with_a_protocol_error(garbage, why) -> None:
    reader = await _reader()
    _feed(reader, b"PING\r\n" + garbage, [4096] * 1000)
    assert isinstance(reader.error, ProtocolError) and why in reader.error.args[0]
    assert reader.transport.closed
    assert await reader.take_all() == [b"PING\r\n"]  # what came before is still delivered
    with pytest.raises(ProtocolError):
        await reader.take_all()


async def test_reading_pauses_while_too_much_waits_and_resumes_once_taken() -> None:
    reader = await _reader()
    big = os.urandom(1020 * 1024)
    _feed(reader, b"".join(b"MSG a 1 %d\r\n" % len(big) + big + b"\r\n" for _ in range(10)),
          [65536] * 1000)
    assert reader.transport.paused == 1
    assert len(await reader.take_all()) == 10
    assert reader.transport.paused == 0


async def test_eof_ends_the_reader_after_what_was_received() -> None:
    reader = await _reader()
    _feed(reader, b"PONG\r\nMSG a 1 3\r\nab", [100])
    reader.eof_received()
    assert await reader.take_all() == [b"PONG\r\n"]
    assert await reader.take_all() == [] and reader.eof


@pytest.fixture
def nats_url(tmp_path):
    stack = Stack(tmp_path, nats_port=free_port(), api_port=free_port())
    stack.start_nats()
    yield stack
    stack.stop()


async def test_real_broker_frames_subscribers_get_big_payloads_uncopied(nats_url) -> None:
    """Over nats-server: a subscribe_frames() callback gets big payloads as the bytearray
    they were read into, a plain subscription gets bytes; both see every message in
    order, including requests and replies, and a reconnect keeps the transport."""
    nc = await connect(nats_url.nats_url, "natsread-test")
    assert isinstance(nc._transport, DirectTransport)
    framed: list = []
    plain: list = []
    done = asyncio.Event()
    sizes = [size for size in SIZES for _ in range(3)]

    async def on_framed(msg) -> None:
        framed.append(msg.data)

    async def on_plain(msg) -> None:
        plain.append(msg.data)
        if len(plain) == len(sizes):
            done.set()

    async def echo(msg) -> None:
        await msg.respond(msg.data)

    await subscribe_frames(nc, "rt.data", cb=on_framed)
    await nc.subscribe("rt.data", cb=on_plain)
    await nc.subscribe("rt.echo", cb=echo)
    sent = [os.urandom(n) for n in sizes]
    for payload in sent:
        await nc.publish("rt.data", payload)
    await asyncio.wait_for(done.wait(), 20)
    assert [bytes(p) for p in framed] == sent and plain == sent
    assert all(type(p) is bytes for p in plain)
    assert all(type(p) is bytearray for p, s in zip(framed, sent, strict=True)
               if len(s) >= DIRECT_READ)
    reply = await nc.request("rt.echo", b"x" * 500_000, timeout=5)
    assert reply.data == b"x" * 500_000 and type(reply.data) is bytes
    # The broker restarts: the client reconnects through the same transport and goes on.
    transport = nc._transport
    proc = nats_url.procs.pop("nats")
    await asyncio.to_thread(stop_pid, proc.pid, 10.0, proc)
    await asyncio.to_thread(nats_url.start_nats)
    async def reconnected() -> None:
        while not nc.is_connected:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(reconnected(), 20)
    framed.clear()
    plain.clear()
    done.clear()
    for payload in sent:
        await nc.publish("rt.data", payload)
    await asyncio.wait_for(done.wait(), 20)
    assert nc._transport is transport and plain == sent
    await nc.close()


async def test_a_tls_upgrade_falls_back_to_the_stream_path(tmp_path) -> None:
    """A broker that asks for TLS: the transport upgrades its connection and then reads
    through nats-py's stream path; big messages still arrive whole."""
    import shutil
    import ssl
    import subprocess

    from rune.cli.devstack import nats_server_binary, wait_until

    if shutil.which("openssl") is None:
        pytest.skip("no openssl on PATH to make the broker's certificate")

    from rune.natsconn import _client

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    port = free_port()
    conf = tmp_path / "tls.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\ntls {{\n  cert_file: "{cert}"\n'
                    f'  key_file: "{key}"\n}}\n')
    server = subprocess.Popen([nats_server_binary(), "-c", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import socket

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, "nats-server with TLS", proc=server)
        context = ssl.create_default_context(cafile=str(cert))
        url = f"tls://127.0.0.1:{port}"
        nc = _client([url])
        assert isinstance(nc._transport, DirectTransport)
        await nc.connect(servers=[url], tls=context, connect_timeout=5,
                         allow_reconnect=False)
        assert nc._transport._streams is not None  # upgraded: nats-py's stream path
        got: list[bytes] = []
        done = asyncio.Event()

        async def on_msg(msg) -> None:
            got.append(msg.data)
            done.set()

        await subscribe_frames(nc, "tls.data", cb=on_msg)
        payload = os.urandom(900_000)
        await nc.publish("tls.data", payload)
        await asyncio.wait_for(done.wait(), 10)
        assert got == [payload]
        await nc.close()
    finally:
        server.kill()
        server.wait()
