"""A small asynchronous client of the Docker Engine API: the exec calls, on the event loop.

The docker SDK (synchronous, requests) stays for listing, events and containers; an exec's
calls are few, small and on every session's setup path, so they go straight over the
engine's socket here: HTTP/1.1 on kept-alive connections, no thread hop per call, and
`exec start` upgrades its own fresh connection into the exec's raw stream (see
engine_stream.py).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

DEFAULT_URL = "unix:///var/run/docker.sock"
CALL_TIMEOUT = 30.0
IDLE_KEPT = 8  # kept-alive connections for the JSON calls
MAX_HEAD = 64 * 1024
CONSOLE_SIZE_SINCE = (1, 42)  # exec create takes ConsoleSize from API 1.42 on


class EngineError(Exception):
    """The engine answered with an HTTP error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.explanation = message


def engine_url(base_url: str | None) -> str:
    """base_url, else DOCKER_HOST, else the local socket; TLS is the SDK's alone."""
    url = base_url or os.environ.get("DOCKER_HOST") or DEFAULT_URL
    if not base_url and os.environ.get("DOCKER_TLS_VERIFY"):
        raise ConnectionError("DOCKER_TLS_VERIFY is set: exec over TLS is not supported")
    return url


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> object:
        return json.loads(self.body) if self.body else None


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """'HTTP/1.1 201 Created\\r\\nA: b\\r\\n…' → (201, {'a': 'b'})."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ConnectionError(f"not an HTTP response from the engine: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def error_message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", "")) or body.decode(errors="replace")
    except (ValueError, AttributeError):
        return body.decode(errors="replace").strip()


class EngineAPI:
    """One engine: a pool of idle connections, the negotiated API version."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme in ("unix", "http+unix"):
            self._unix: str | None = parts.path or "/var/run/docker.sock"
            self._tcp: tuple[str, int] | None = None
        elif parts.scheme in ("tcp", "http"):
            self._unix, self._tcp = None, (parts.hostname or "localhost", parts.port or 2375)
        else:
            raise ConnectionError(f"engine URL {url!r}: only unix:// and tcp:// are supported")
        self.version = "1.41"
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    @property
    def console_size_at_create(self) -> bool:
        return tuple(int(x) for x in self.version.split(".")) >= CONSOLE_SIZE_SINCE

    async def negotiate(self) -> None:
        """Speaks the engine's own API version (what `docker version` calls Server API)."""
        answer = await self.call("GET", "/version", versioned=False)
        self.version = str(answer.get("ApiVersion") or self.version)

    # --- connections ------------------------------------------------------------------
    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._unix is not None:
            return await asyncio.open_unix_connection(self._unix, limit=MAX_HEAD)
        return await asyncio.open_connection(*self._tcp, limit=MAX_HEAD)

    async def connect(self, protocol_factory: Callable[[], asyncio.BaseProtocol]
                      ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """A fresh connection driven by a protocol of the caller (the exec's stream)."""
        loop = asyncio.get_running_loop()
        if self._unix is not None:
            return await loop.create_unix_connection(protocol_factory, self._unix)
        return await loop.create_connection(protocol_factory, *self._tcp)

    def request_bytes(self, method: str, path: str, body: object = None,
                      headers: dict[str, str] | None = None, versioned: bool = True) -> bytes:
        payload = b"" if body is None else json.dumps(body).encode()
        target = f"/v{self.version}{path}" if versioned else path
        lines = [f"{method} {target} HTTP/1.1", "Host: docker", "User-Agent: rune-agent",
                 f"Content-Length: {len(payload)}"]
        if body is not None:
            lines.append("Content-Type: application/json")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload

    # --- JSON calls -------------------------------------------------------------------
    async def call(self, method: str, path: str, body: object = None,
                   versioned: bool = True) -> object:
        """One request/response; raises EngineError for an HTTP error status."""
        request = self.request_bytes(method, path, body, versioned=versioned)
        async with asyncio.timeout(CALL_TIMEOUT):
            response = await self._exchange(request)
        if response.status >= 400:
            raise EngineError(response.status, error_message(response.body))
        return response.json()

    async def _exchange(self, request: bytes) -> Response:
        while self._idle:
            reader, writer = self._idle.pop()
            try:
                return await self._over(reader, writer, request)
            except ConnectionError:
                writer.close()  # the engine closed an idle connection: take another
        reader, writer = await self._open()
        return await self._over(reader, writer, request)

    async def _over(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes) -> Response:
        kept = False
        try:
            writer.write(request)
            response, kept = await read_response(reader)
            return response
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError("the engine closed the connection mid-response") from exc
        finally:
            if kept and len(self._idle) < IDLE_KEPT:
                self._idle.append((reader, writer))
            else:
                writer.close()

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    # --- exec -------------------------------------------------------------------------
    async def exec_create(self, container: str, spec: dict) -> str:
        created = await self.call("POST", f"/containers/{container}/exec", spec)
        return str(created["Id"])

    async def exec_inspect(self, exec_id: str) -> dict:
        return await self.call("GET", f"/exec/{exec_id}/json")

    async def exec_resize(self, exec_id: str, width: int, height: int) -> None:
        query = urlencode({"h": height, "w": width})
        await self.call("POST", f"/exec/{exec_id}/resize?{query}")


async def read_response(reader: asyncio.StreamReader) -> tuple[Response, bool]:
    """A whole response (length, chunked or to EOF) and whether the connection stays usable."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise ConnectionError("the engine's response head is too large") from exc
    status, headers = parse_head(head)
    keep = headers.get("connection", "").lower() != "close"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from the engine
                break
            parts.append((await reader.readexactly(size + 2))[:-2])
        return Response(status, headers, b"".join(parts)), keep
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
        return Response(status, headers, body), keep
    if status in (204, 304) or status < 200:
        return Response(status, headers, b""), keep
    return Response(status, headers, await reader.read()), False
