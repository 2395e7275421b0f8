"""The client API: one exec stream or an instance listing against an apiserver.

Usable in-process (`await run_command(...)`) as well as by the `rune` command.
Every failure surfaces as a RuneError from rune.errors.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

# gRPC core logs a failed TLS handshake on stderr at INFO; the CLI says it in one line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
import grpc  # noqa: E402

from rune.errors import RuneError, Unavailable, from_status
from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc

MAX_MESSAGE = 4 * 1024 * 1024
_CONNECT_FAILURES = ("failed to connect", "connection refused", "dns resolution failed",
                     "name resolution", "connect failed", "unavailable")


@dataclass
class ExecOptions:
    target: str
    command: list[str]
    namespace: str = "default"
    workdir: str = ""
    env: dict[str, str] = field(default_factory=dict)
    tty: bool = False
    width: int = 0
    height: int = 0
    timeout: float = 300.0
    term: str = ""


@dataclass
class ExecResult:
    code: int
    signal: int = 0
    stdout: bytes = b""
    stderr: bytes = b""


class ApiClient:
    def __init__(self, address: str, token: str | None = None, ca_file: str | None = None,
                 tls: bool = False) -> None:
        address, tls = _scheme(address, tls)
        self.address = address
        self.tls = bool(tls or ca_file)
        options = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE)]
        if self.tls:
            roots = open(ca_file, "rb").read() if ca_file else None
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        self.stub = pb_grpc.ExecServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def translate(self, exc: grpc.aio.AioRpcError, started: bool = False) -> RuneError:
        """Turns a gRPC failure into the error tree; transport failures name the server."""
        details = exc.details() or ""
        if started and exc.code() == grpc.StatusCode.UNAVAILABLE and not exc.trailing_metadata():
            # Statuses the server sends on a started stream carry trailers (rune-session);
            # an UNAVAILABLE without them is the connection itself breaking.
            return Unavailable(f"lost the connection to the API server at {self.address} "
                               f"({details or 'connection closed'}); the session ended")
        if exc.code() == grpc.StatusCode.UNAVAILABLE and _is_tls_failure(details):
            return Unavailable(f"failed to create API client: TLS handshake with API server at "
                               f"{self.address} failed: its certificate is not trusted or "
                               f"does not match (check --ca-file) ({details})")
        if exc.code() == grpc.StatusCode.UNAVAILABLE and _is_transport_failure(details):
            return Unavailable(f"failed to create API client: failed to connect to API server "
                               f"at {self.address} ({details})")
        return from_status(exc.code().name, details)

    async def list_instances(self, namespace: str = "default",
                             all_namespaces: bool = False) -> list[pb.Instance]:
        try:
            reply = await self.stub.ListInstances(
                pb.ListInstancesRequest(namespace=namespace, all_namespaces=all_namespaces),
                metadata=self.metadata, timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise self.translate(exc) from None
        return list(reply.instances)

    def exec_stream(self) -> ExecStream:
        return ExecStream(self)


def _scheme(address: str, tls: bool) -> tuple[str, bool]:
    """`https://h:p` forces TLS, `http://h:p` plaintext; a bare h:p is TLS unless loopback."""
    if address.startswith("https://"):
        return address[8:].rstrip("/"), True
    if address.startswith("http://"):
        return address[7:].rstrip("/"), tls
    host = address.rsplit(":", 1)[0].strip("[]")
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    return address, tls or not loopback


def _is_tls_failure(details: str) -> bool:
    lowered = details.lower()
    return any(m in lowered for m in ("ssl", "handshake", "certificate", "tls"))


def _is_transport_failure(details: str) -> bool:
    lowered = details.lower()
    return any(marker in lowered for marker in _CONNECT_FAILURES) and "agent" not in lowered \
        and "broker" not in lowered


class ExecStream:
    """One StreamExec call: start it, feed it, iterate its output events."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.call = client.stub.StreamExec(metadata=client.metadata)
        self.started: pb.Started | None = None

    async def start(self, options: ExecOptions) -> pb.Started:
        init = pb.ExecInit(
            target=options.target, namespace=options.namespace, command=options.command,
            env=options.env, workdir=options.workdir, tty=options.tty, width=options.width,
            height=options.height, timeout_seconds=options.timeout, term=options.term)
        try:
            try:
                await self.call.write(pb.ExecRequest(init=init))
            except asyncio.InvalidStateError:
                pass  # the server already ended the call (a refused token): read says why
            first = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise self.client.translate(exc) from None
        if first is grpc.aio.EOF or first.WhichOneof("msg") != "started":
            raise Unavailable("the API server closed the stream before the session started")
        self.started = first.started
        return self.started

    async def _write(self, request: pb.ExecRequest) -> None:
        try:
            await self.call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call ended; its status is reported by the reading side

    async def send_stdin(self, data: bytes) -> None:
        await self._write(pb.ExecRequest(stdin=data))

    async def close_stdin(self) -> None:
        await self._write(pb.ExecRequest(stdin_close=True))

    async def resize(self, width: int, height: int) -> None:
        await self._write(pb.ExecRequest(resize=pb.Resize(width=width, height=height)))

    async def signal(self, number: int) -> None:
        await self._write(pb.ExecRequest(signal=pb.Signal(number=number)))

    def cancel(self) -> None:
        self.call.cancel()

    async def events(self) -> AsyncIterator[tuple[str, object]]:
        """Yields ('stdout'|'stderr', bytes) and finally ('exit', (code, signal))."""
        while True:
            try:
                response = await self.call.read()
            except grpc.aio.AioRpcError as exc:
                raise self.client.translate(exc, started=True) from None
            if response is grpc.aio.EOF:
                raise Unavailable("the API server ended the stream without an exit status")
            kind = response.WhichOneof("msg")
            if kind == "stdout":
                yield "stdout", response.stdout
            elif kind == "stderr":
                yield "stderr", response.stderr
            elif kind == "exit":
                try:
                    await self.call.done_writing()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    pass
                yield "exit", (response.exit.code, response.exit.signal)
                return


async def run_command(client: ApiClient, options: ExecOptions,
                      stdin: bytes | None = None) -> ExecResult:
    """Runs one command to completion and collects its output (for scripts and benches)."""
    stream = client.exec_stream()
    await stream.start(options)

    async def feed() -> None:
        if stdin:
            for i in range(0, len(stdin), 256 * 1024):
                await stream.send_stdin(stdin[i:i + 256 * 1024])
        await stream.close_stdin()

    feeder = asyncio.create_task(feed())
    out, err = bytearray(), bytearray()
    try:
        async for kind, payload in stream.events():
            if kind == "stdout":
                out += payload
            elif kind == "stderr":
                err += payload
            else:
                code, sig = payload
                return ExecResult(code, sig, bytes(out), bytes(err))
    finally:
        feeder.cancel()
    raise Unavailable("no exit status")
