"""The multiplexer's socket: where it lives, who may use it, and its messages.

Standard library only: the `rune` fast path imports this and nothing heavy.

A message is a 4-byte big-endian length and a mapping with a type `t`, in the small
tagged encoding below (not JSON: `json` loads `re` and `enum`, which would cost the
fast path more than everything else it imports). The
client's first message (`hello`) carries its stdin, stdout and stderr as SCM_RIGHTS
descriptors; after it come `signal` messages, and the multiplexer answers
`accepted` (or `refused` with a reason), `suspended` (after a SIGTSTP, once the
terminal is cooked) and finally `exit` with the status. `status` and `stop` are
control requests of `rune mux`.
"""

from __future__ import annotations

import _socket
import os
import stat
import struct

TYPE_CHECKING = False  # typing itself costs the fast path more than all the rest here
if TYPE_CHECKING:
    from collections.abc import Mapping
    from socket import socket

HEADER = struct.Struct(">I")
MAX_MESSAGE = 1 << 20
# The environment rune's commands read (config and token paths, terminal, colours).
ENV_NAMES = frozenset({"HOME", "TERM", "NO_COLOR", "COLUMNS", "LINES", "USER", "LOGNAME",
                       "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR",
                       "XDG_CACHE_HOME"})
DEFAULT_IDLE = 600.0


class MuxUnsafe(OSError):
    """The socket directory is not private to this user: refuse to use it."""


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k in ENV_NAMES or k.startswith("RUNE_")}


def mux_dir(environ: Mapping[str, str]) -> str:
    """$RUNE_MUX_DIR, else $XDG_RUNTIME_DIR/rune, else a 0700 folder in the cache dir."""
    explicit = environ.get("RUNE_MUX_DIR")
    if explicit:
        return explicit
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "rune")
    home = environ.get("HOME") or os.path.expanduser("~")
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return os.path.join(cache, "rune", f"mux-{os.getuid()}")


def private_dir(path: str) -> str:
    """Makes PATH (0700) if needed and checks it is ours and closed to everyone else."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise MuxUnsafe(f"{path} is not a directory owned by uid {os.getuid()}")
    if info.st_mode & 0o077:
        raise MuxUnsafe(f"{path} is open to others (mode {stat.S_IMODE(info.st_mode):o}); "
                        "chmod 700 it")
    return path


# In the socket's name: a client never speaks to a multiplexer that cannot parse its
# messages (one of another encoding would only drop the connection, so it could not
# be told to step aside). The old one serves its own clients until it idles out.
PROTOCOL = 2


def socket_path(folder: str) -> str:
    return os.path.join(folder, f"mux.{PROTOCOL}.sock")


def pid_path(folder: str) -> str:
    return os.path.join(folder, f"mux.{PROTOCOL}.pid")


def peer_uid(sock: socket | _socket.socket) -> int:
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


MAX_DEPTH = 4  # a hello's env is a mapping inside the message: nothing needs more


def _put(value: object, out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("message nested too deeply")
    if value is None or value is True or value is False:
        out.append(b"N" if value is None else b"T" if value else b"F")
    elif isinstance(value, int):
        out.append(b"i%d;" % value)
    elif isinstance(value, float):
        out.append(b"f" + repr(value).encode() + b";")
    elif isinstance(value, str):
        # surrogateescape: argv words and environment values need not be UTF-8
        data = value.encode("utf-8", "surrogateescape")
        out += (b"s%d:" % len(data), data)
    elif isinstance(value, (list, tuple)):
        out.append(b"l%d:" % len(value))
        for item in value:
            _put(item, out, depth + 1)
    elif isinstance(value, dict):
        out.append(b"d%d:" % len(value))
        for key, item in value.items():
            _put(str(key), out, depth + 1)
            _put(item, out, depth + 1)
    else:
        raise TypeError(f"cannot send a {type(value).__name__}")


def encode(message: dict) -> bytes:
    parts: list[bytes] = []
    _put(message, parts, 0)
    body = b"".join(parts)
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"message of {len(body)} bytes is too large")
    return HEADER.pack(len(body)) + body


class _Parser:
    """Reads one encoded value; every count and length is checked against what is there."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.at = 0

    def _number(self, end: bytes) -> bytes:
        stop = self.body.find(end, self.at, self.at + 32)
        if stop < 0:
            raise ValueError("malformed message: a number without its end")
        word = self.body[self.at:stop]
        self.at = stop + 1
        return word

    def _count(self) -> int:
        word = self._number(b":")
        if not word.isdigit():
            raise ValueError("malformed message: a bad length")
        count = int(word)
        if count > len(self.body) - self.at:  # each item takes at least one byte
            raise ValueError("malformed message: a length past its end")
        return count

    def value(self, depth: int = 0) -> object:
        if depth > MAX_DEPTH:
            raise ValueError("message nested too deeply")
        if self.at >= len(self.body):
            raise ValueError("malformed message: it ends early")
        tag = self.body[self.at:self.at + 1]
        self.at += 1
        if tag in (b"N", b"T", b"F"):
            return None if tag == b"N" else tag == b"T"
        if tag == b"i":
            word = self._number(b";")
            if not word.lstrip(b"-").isdigit():
                raise ValueError("malformed message: a bad integer")
            return int(word)
        if tag == b"f":
            return float(self._number(b";").decode("ascii"))
        if tag == b"s":
            size = self._count()
            data = self.body[self.at:self.at + size]
            self.at += size
            return data.decode("utf-8", "surrogateescape")
        if tag == b"l":
            return [self.value(depth + 1) for _ in range(self._count())]
        if tag == b"d":
            mapping = {}
            for _ in range(self._count()):
                key = self.value(depth + 1)
                if not isinstance(key, str):
                    raise ValueError("malformed message: a key that is not text")
                mapping[key] = self.value(depth + 1)
            return mapping
        raise ValueError(f"malformed message: unknown tag {tag!r}")


def decode(body: bytes) -> dict:
    parser = _Parser(body)
    message = parser.value()
    if not isinstance(message, dict):
        raise ValueError("a message must be a mapping")
    if parser.at != len(body):
        raise ValueError("malformed message: bytes after its end")
    return message


class Reader:
    """Splits a byte stream into messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > MAX_MESSAGE:
                raise ValueError(f"message of {size} bytes is too large")
            if len(self._buffer) < HEADER.size + size:
                break
            body = bytes(self._buffer[HEADER.size:HEADER.size + size])
            del self._buffer[:HEADER.size + size]
            messages.append(decode(body))
        return messages


def request(folder: str, message: dict, timeout: float = 5.0) -> dict | None:
    """One control request (`status`, `stop`) to the multiplexer in FOLDER; None: none runs."""
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path(folder))
            if peer_uid(sock) != os.getuid():
                raise MuxUnsafe("the multiplexer's socket belongs to another user")
            sock.sendall(encode(message))
            reader = Reader()
            while True:
                data = sock.recv(65536)
                if not data:
                    return None
                replies = reader.feed(data)
                if replies:
                    return replies[0]
    except (TimeoutError, ConnectionRefusedError, FileNotFoundError):
        return None
