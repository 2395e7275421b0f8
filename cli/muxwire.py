"""The multiplexer's socket: where it lives, who may use it, and its messages.

Standard library only: the `rune` fast path imports this and nothing heavy.

A message is a 4-byte big-endian length and a JSON object with a type `t`. The
client's first message (`hello`) carries its stdin, stdout and stderr as SCM_RIGHTS
descriptors; after it come `signal` messages, and the multiplexer answers
`accepted` (or `refused` with a reason), `suspended` (after a SIGTSTP, once the
terminal is cooked) and finally `exit` with the status. `status` and `stop` are
control requests of `rune mux`.
"""

from __future__ import annotations

import _socket
import json
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


def socket_path(folder: str) -> str:
    return os.path.join(folder, "mux.sock")


def pid_path(folder: str) -> str:
    return os.path.join(folder, "mux.pid")


def peer_uid(sock: socket | _socket.socket) -> int:
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def encode(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


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
            message = json.loads(body)
            if not isinstance(message, dict):
                raise ValueError("a message must be a JSON object")
            messages.append(message)
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
