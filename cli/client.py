"""The client API: one exec stream or an instance listing against an apiserver.

Usable in-process (`await run_command(...)`) as well as by the `rune` command.
Every failure surfaces as a RuneError from rune.errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

# gRPC core logs a failed TLS handshake on stderr at INFO; the CLI says it in one line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
import grpc  # noqa: E402
from rune.cli.wire import exec_stream

from rune.errors import RuneError, Unavailable, from_status
from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc
from rune.protowire import BytesMessage

MAX_MESSAGE = 4 * 1024 * 1024
UNARY_TIMEOUT = 30
CONNECT_HINT = "is the apiserver running? `rune dev up` starts a local one"
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
    """A connection to one apiserver: a method per RPC, every failure through `translate`.

    `channels` lends a channel kept warm by its owner (the multiplexer); without it the
    client makes its own and closes it with the client.
    """

    def __init__(self, address: str, token: str | None = None, ca_file: str | None = None,
                 tls: bool = False, channels: ChannelPool | None = None) -> None:
        self.address = address
        target, tls, name = _target(address, tls)
        self.tls = bool(tls or ca_file)
        roots = _read_roots(ca_file) if self.tls and ca_file else None
        self._owned = channels is None
        pool = channels if channels is not None else ChannelPool()
        self.channel = pool.channel(target, self.tls, roots, token, name)
        self.stub = pb_grpc.ExecServiceStub(self.channel)
        self.fanout_stub = pb_grpc.FanoutServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def close(self) -> None:
        if self._owned:
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
                               f"at {self.address} ({details}); {CONNECT_HINT}")
        return from_status(exc.code().name, details)

    async def _unary(self, method: object, request: object) -> object:
        try:
            return await method(request, metadata=self.metadata, timeout=UNARY_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise self.translate(exc) from None

    async def _streamed(self, method: object, request: object) -> AsyncIterator[object]:
        call = method(request, metadata=self.metadata)
        try:
            while True:
                try:
                    item = await call.read()
                except grpc.aio.AioRpcError as exc:
                    raise self.translate(exc) from None
                if item is grpc.aio.EOF:
                    return
                yield item
        finally:
            call.cancel()

    async def list_instances(self, namespace: str = "default",
                             all_namespaces: bool = False) -> list[pb.Instance]:
        reply = await self._unary(self.stub.ListInstances, pb.ListInstancesRequest(
            namespace=namespace, all_namespaces=all_namespaces))
        return list(reply.instances)

    async def list_sessions(self, namespace: str = "default",
                            all_namespaces: bool = False) -> list[pb.SessionInfo]:
        reply = await self._unary(self.stub.ListSessions, pb.ListSessionsRequest(
            namespace=namespace, all_namespaces=all_namespaces))
        return list(reply.sessions)

    async def kill_session(self, session_id: str, reason: str = "") -> None:
        await self._unary(self.stub.KillSession,
                          pb.KillSessionRequest(session_id=session_id, reason=reason))

    def replay_session(self, session_id: str) -> AsyncIterator[pb.CastChunk]:
        return self._streamed(self.stub.ReplaySession, pb.ReplayRequest(session_id=session_id))

    def stream_audit(self, request: pb.AuditRequest) -> AsyncIterator[pb.AuditEvent]:
        return self._streamed(self.stub.StreamAudit, request)

    def stream_fanout(self, request: pb.FanoutRequest) -> AsyncIterator[pb.FanoutResponse]:
        return self._streamed(self.fanout_stub.StreamFanout, request)

    def exec_stream(self) -> ExecStream:
        return ExecStream(self)


class ChannelPool:
    """Makes gRPC channels; a keeping pool (the multiplexer's) hands out warm ones.

    A kept channel is keyed by (address, TLS, CA bundle digest, token digest), so a
    changed CA or token never rides on a channel made for another.
    """

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self._channels: dict[tuple, grpc.aio.Channel] = {}

    def channel(self, address: str, tls: bool, roots: bytes | None,
                token: str | None, name: str | None = None) -> grpc.aio.Channel:
        key = (address, tls, _digest(roots), _digest(token.encode() if token else None))
        kept = self._channels.get(key)
        if kept is not None:
            state = kept.get_state(try_to_connect=False)
            if state not in (grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                             grpc.ChannelConnectivity.SHUTDOWN):
                return kept
            # A failed channel would refuse at once during its back-off: start afresh.
            self._channels.pop(key)
            asyncio.get_running_loop().create_task(kept.close())
        options = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE)]
        if name and tls:  # several addresses: their certificates name the first one's host
            options.append(("grpc.ssl_target_name_override", name))
        if tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            made = grpc.aio.secure_channel(address, credentials, options=options)
        else:
            made = grpc.aio.insecure_channel(address, options=options)
        if self.keep:
            self._channels[key] = made
        return made

    def __len__(self) -> int:
        return len(self._channels)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


def _digest(data: bytes | None) -> str:
    return hashlib.sha256(data).hexdigest() if data is not None else ""


def _read_roots(ca_file: str) -> bytes:
    try:
        with open(ca_file, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise OSError(f"cannot read CA file {ca_file}: {exc.strerror}") from None


def _target(address: str, tls: bool) -> tuple[str, bool, str | None]:
    """The gRPC target of `--api-server`: one address as it is, or several (`a:8443,b:8443`)
    as one list that gRPC tries in order (pick_first), going on to the next when one
    refuses: (target, tls, the first host's name for TLS, or None)."""
    parts = [p.strip() for p in address.split(",") if p.strip()]
    if len(parts) <= 1:
        one, tls = _scheme(parts[0] if parts else address, tls)
        return one, tls, None
    import socket

    resolved, first = [], None
    for part in parts:
        one, part_tls = _scheme(part, tls)
        tls = tls or part_tls
        host, _, port = one.rpartition(":")
        host = host.strip("[]")
        first = first or host
        try:
            infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, ValueError):
            continue  # an address that does not resolve is one that does not answer
        resolved += [f"{info[4][0]}:{port}" for info in infos[:1]]
    if not resolved:
        raise OSError(f"none of the API server addresses {address!r} resolves")
    return "ipv4:" + ",".join(resolved), tls, first


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
        self.call = exec_stream(client.channel)(metadata=client.metadata)
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
            if type(response) is BytesMessage:  # output, as a view (rune/cli/wire.py)
                yield response.kind, response.data
                continue
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
