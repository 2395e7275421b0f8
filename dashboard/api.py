"""The dashboard's one channel to the apiserver; every call carries the signed-in user's token.

The dashboard holds no permissions of its own: RBAC is decided by the apiserver
for each call, exactly as for the CLI.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
import grpc  # noqa: E402

from rune.errors import RuneError, from_status  # noqa: E402
from rune.proto import exec_pb2 as pb  # noqa: E402
from rune.proto import exec_pb2_grpc as pb_grpc  # noqa: E402

MAX_MESSAGE = 4 * 1024 * 1024


def _tls_wanted(address: str, ca_file: str | None) -> tuple[str, bool]:
    """As the CLI: TLS for https://, a CA file, or any non-loopback address; `http://`
    says plaintext explicitly (an apiserver on a private network, started --insecure)."""
    if address.startswith("https://"):
        return address.removeprefix("https://"), True
    if address.startswith("http://"):
        return address.removeprefix("http://"), bool(ca_file)
    host = address.rsplit(":", 1)[0].strip("[]")
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    return address, bool(ca_file) or not loopback


class Api:
    def __init__(self, address: str, ca_file: str | None = None) -> None:
        address, tls = _tls_wanted(address, ca_file)
        self.address = address
        options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
        if tls:
            roots = Path(ca_file).read_bytes() if ca_file else None
            self.channel = grpc.aio.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=roots), options=options)
        else:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        self.stub = pb_grpc.ExecServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    @staticmethod
    def _auth(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    @staticmethod
    def translate(exc: grpc.aio.AioRpcError) -> RuneError:
        return from_status(exc.code().name, exc.details() or exc.code().name.lower())

    async def live_sessions(self, token: str) -> list[pb.SessionInfo]:
        """The live sessions of every namespace this user may audit."""
        try:
            reply = await self.stub.ListSessions(
                pb.ListSessionsRequest(all_namespaces=True, active_only=True),
                metadata=self._auth(token), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise self.translate(exc) from None
        return list(reply.sessions)

    async def recorded_sessions(self, token: str) -> list[pb.SessionInfo]:
        try:
            reply = await self.stub.ListSessions(pb.ListSessionsRequest(all_namespaces=True),
                                                 metadata=self._auth(token), timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise self.translate(exc) from None
        return [s for s in reply.sessions if s.recorded and s.state != "active"]

    async def search(self, token: str, request: pb.AuditSearchRequest) -> pb.AuditSearchResponse:
        try:
            return await self.stub.SearchAudit(request, metadata=self._auth(token), timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise self.translate(exc) from None

    async def follow(self, token: str, cursor: str) -> AsyncIterator[pb.AuditEvent]:
        call = self.stub.FollowAudit(pb.AuditSearchRequest(cursor=cursor),
                                     metadata=self._auth(token))
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise self.translate(exc) from None
        finally:
            call.cancel()

    async def observe(self, token: str, session_id: str) -> AsyncIterator[pb.ObserveChunk]:
        call = self.stub.ObserveSession(pb.ObserveRequest(session_id=session_id),
                                        metadata=self._auth(token))
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise self.translate(exc) from None
        finally:
            call.cancel()

    async def replay(self, token: str, session_id: str) -> AsyncIterator[bytes]:
        call = self.stub.ReplaySession(pb.ReplayRequest(session_id=session_id),
                                       metadata=self._auth(token))
        try:
            async for chunk in call:
                yield chunk.data
        except grpc.aio.AioRpcError as exc:
            raise self.translate(exc) from None
        finally:
            call.cancel()

    async def kill(self, token: str, session_id: str, reason: str) -> None:
        try:
            await self.stub.KillSession(pb.KillSessionRequest(session_id=session_id,
                                                              reason=reason),
                                        metadata=self._auth(token), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise self.translate(exc) from None
