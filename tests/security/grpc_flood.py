"""A gRPC bidi call written straight onto HTTP/2 (h2), for floods: the requests are encoded
once and sent in large DATA frames, so the sender costs almost nothing per message and
what is measured is the server. Plaintext (h2c, prior knowledge) on loopback only."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events

CHUNK = 256 * 1024  # bytes of encoded messages handed to h2 at a time


def grpc_frame(message: bytes) -> bytes:
    """gRPC's length-prefixed message: not compressed, 4-byte big-endian length."""
    return struct.pack(">BI", 0, len(message)) + message


class RawBidi:
    """One bidi-streaming call: send pre-encoded messages, read the responses' bytes."""

    def __init__(self, address: str, path: str, metadata: tuple, timeout: float) -> None:
        host, port = address.rsplit(":", 1)
        self.deadline = time.monotonic() + timeout
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.stream, [
            (":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", address), ("content-type", "application/grpc"),
            ("te", "trailers"), *metadata])
        self._flush()
        self.received = bytearray()  # gRPC-framed response bytes, not yet taken
        self.trailers: dict[str, str] = {}
        self.ended = False

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _pump(self) -> None:
        """Reads what the server sent and handles it (window updates, settings, data)."""
        if time.monotonic() > self.deadline:
            raise TimeoutError("the call outlived its deadline")
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self.received += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                self.trailers = dict(event.headers)
            elif isinstance(event, h2.events.ResponseReceived):
                self.trailers.update(dict(event.headers))  # a trailers-only answer
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                self.ended = True
        self._flush()

    def send(self, chunks: Iterator[bytes]) -> None:
        """Sends every chunk of encoded messages, as fast as flow control lets it."""
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                if self.ended:
                    raise ConnectionError(f"the call ended: {self.trailers}")
                room = min(self.conn.local_flow_control_window(self.stream),
                           self.conn.max_outbound_frame_size, len(view))
                if room <= 0:
                    self._pump()
                    continue
                self.conn.send_data(self.stream, view[:room].tobytes())
                view = view[room:]
                self._flush()

    def messages(self) -> Iterator[bytes]:
        """Each response message's bytes until the call ends."""
        while True:
            while len(self.received) >= 5:
                size = struct.unpack(">I", self.received[1:5])[0]
                if len(self.received) < 5 + size:
                    break
                message = bytes(self.received[5:5 + size])
                del self.received[:5 + size]
                yield message
            if self.ended:
                return
            self._pump()

    def close_send(self) -> None:
        self.conn.end_stream(self.stream)
        self._flush()

    def close(self) -> None:
        self.sock.close()
