"""The `rune` side of the multiplexer: pass argv and stdio over, relay signals, exit alike.

Standard library only. When no multiplexer answers, one is started (and waited for);
when that fails too, the caller runs the command in its own process.
"""

from __future__ import annotations

# _signal and _socket, not signal and socket: the same calls without the enums and
# selectors those modules build at import, which a warm `rune exec` would pay for.
import _signal as signal
import _socket as socket
import fcntl
import os
import select
import struct
import sys
import time

from rune.cli import muxwire
from rune.cli.version import build_id

RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH, signal.SIGTSTP,
           signal.SIGCONT)
START_TIMEOUT = 15.0
SUSPEND_WAIT = 1.0
# A stop signal sent to our own group that returns sooner than this was discarded by the
# kernel (an orphaned process group): a read there fails with EIO instead.
DISCARDED_STOP = 0.01


def _in_background() -> bool:
    """Whether stdin is our controlling terminal and another process group has it."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) != os.getpgrp()
    except OSError:  # a terminal, but not ours: reading it never stops us
        return False


def _wait_for_foreground() -> bool:
    """Stops with SIGTTIN while we are a background job on our terminal, as a read would.

    The multiplexer has no controlling terminal, so the kernel would let it read ours even
    while we are a background job: it would take the keystrokes of the shell in front.
    So we do what the kernel does to a background reader (an in-process `rune` or `ssh`
    meets it): stop until brought to the foreground. False where the job cannot stop
    (SIGTTIN ignored, an orphaned group): there the read would fail instead.
    """
    while _in_background():
        if signal.getsignal(signal.SIGTTIN) == signal.SIG_IGN:
            return False
        began = time.monotonic()
        os.killpg(0, signal.SIGTTIN)
        if _in_background() and time.monotonic() - began < DISCARDED_STOP:
            return False
    return True


def _stdin_to_hand_over() -> int:
    """Descriptor 0 once the terminal is ours to give; /dev/null (EOF) where it never is."""
    return 0 if _wait_for_foreground() else os.open(os.devnull, os.O_RDONLY)


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    if muxwire.peer_uid(sock) != os.getuid():
        sock.close()
        raise muxwire.MuxUnsafe(f"{path} is served by another user")
    return sock


def _start(folder: str) -> bool:
    """Starts a multiplexer in FOLDER and waits until it listens; False if it did not."""
    ready_r, ready_w = os.pipe()
    log = os.path.join(folder, "mux.log")
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
               (os.POSIX_SPAWN_DUP2, 1, 2),
               (os.POSIX_SPAWN_DUP2, ready_w, 3)]
    argv = [sys.executable, "-P", "-m", "rune.cli.muxserver", "--ready-fd", "3", "--dir", folder]
    try:
        os.posix_spawn(sys.executable, argv, dict(os.environ), file_actions=actions,
                       setsid=True)
    except OSError:
        os.close(ready_r)
        os.close(ready_w)
        return False
    os.close(ready_w)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([ready_r], [], [], left)[0]:
                return False
            return os.read(ready_r, 16).startswith(b"ready")
        return False
    finally:
        os.close(ready_r)


def _open(folder: str) -> socket.socket | None:
    """A connection to the running multiplexer, starting one if none answers."""
    path = muxwire.socket_path(folder)
    sock = _connect(path)
    if sock is not None:
        return sock
    with open(os.path.join(folder, "mux.lock"), "a") as lock:
        # One starter at a time: a second client waits, then finds the first one's.
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is None and _start(folder):
            sock = _connect(path)
        return sock


def _hello(sock: socket.socket, argv: list[str], reader: muxwire.Reader,
           pending: list[dict]) -> dict | None:
    """Sends argv and the stdio descriptors; the answer (what came after it stays pending)."""
    message = {"t": "hello", "version": build_id(), "argv": argv, "cwd": os.getcwd(),
               "env": muxwire.forwarded_env(os.environ)}
    stdin = _stdin_to_hand_over()
    try:
        rights = struct.pack("3i", stdin, 1, 2)
        sock.sendmsg([muxwire.encode(message)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
    finally:
        if stdin != 0:
            os.close(stdin)
    return _next(sock, reader, pending)


def _next(sock: socket.socket, reader: muxwire.Reader, pending: list[dict]) -> dict | None:
    while not pending:
        try:
            data = sock.recv(65536)
        except InterruptedError:
            continue
        except OSError:
            return None
        if not data:
            return None
        pending.extend(reader.feed(data))
    return pending.pop(0)


def run_through_mux(argv: list[str]) -> int | None:
    """The command's exit status through the multiplexer; None: run it here instead."""
    try:
        folder = muxwire.private_dir(muxwire.mux_dir(os.environ))
        sock = _open(folder)
        if sock is None:
            return None
        wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w)
        for signum in RELAYED:
            signal.signal(signum, lambda *_: None)
        saved = _saved_terminal()  # before the multiplexer may make it raw
        reader, pending = muxwire.Reader(), []
        reply = _hello(sock, argv, reader, pending)
        if reply is not None and reply.get("t") == "refused" and reply.get("reason") == "version":
            # A multiplexer of another install: it has stepped aside; start ours.
            sock.close()
            sock = _open(folder)
            reader, pending = muxwire.Reader(), []
            reply = _hello(sock, argv, reader, pending) if sock is not None else None
        if reply is None or reply.get("t") != "accepted":
            return _restore_and_run_here()
    except muxwire.MuxUnsafe as exc:
        sys.stderr.write(f"Warning: not using the multiplexer: {exc}\n")
        return None
    except OSError:
        return _restore_and_run_here()
    return _relay(sock, wakeup_r, reply, saved, reader, pending)


def _restore_and_run_here() -> None:
    """Undoes the relay's signal set-up, so that the command can run in this process."""
    for signum in RELAYED:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.set_wakeup_fd(-1)
    return None


def _saved_terminal() -> list | None:
    try:
        import termios

        return termios.tcgetattr(0) if os.isatty(0) else None
    except (ImportError, OSError):
        return None


def _relay(sock: socket.socket, wakeup: int, accepted: dict, saved: list | None,
           reader: muxwire.Reader, pending: list[dict]) -> int:
    """Relays signals until the exit status; a vanished multiplexer ends us with 255."""
    while True:
        ready = select.select([sock, wakeup], [], [])[0] if not pending else [sock]
        if wakeup in ready:
            for signum in os.read(wakeup, 64):
                if signum == signal.SIGCONT and _in_background() and \
                        not _wait_for_foreground():
                    continue  # `bg`: the multiplexer leaves the terminal unread meanwhile
                if _send(sock, {"t": "signal", "n": signum}) and signum == signal.SIGTSTP:
                    _suspend(sock, reader, pending)
        if sock in ready:
            message = _next(sock, reader, pending)
            if message is None:
                return _lost(saved, accepted)
            if message.get("t") == "exit":
                return int(message.get("code", 255))


def _send(sock: socket.socket, message: dict) -> bool:
    try:
        sock.sendall(muxwire.encode(message))
        return True
    except OSError:
        return False


def _suspend(sock: socket.socket, reader: muxwire.Reader, pending: list[dict]) -> None:
    """After the multiplexer has given the terminal back (or a moment), stop as asked."""
    deadline = time.monotonic() + SUSPEND_WAIT
    while (left := deadline - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
        message = _next(sock, reader, pending)
        if message is None:
            break
        if message.get("t") == "suspended":
            break
        pending.append(message)
    os.kill(os.getpid(), signal.SIGSTOP)


def _lost(saved: list | None, accepted: dict) -> int:
    if saved is not None:
        import termios

        try:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        except (termios.error, OSError):
            pass
        os.write(2, b"\r\n")
    os.write(2, f"Error: lost the connection to the rune multiplexer (pid "
                f"{accepted.get('pid', '?')}); the session ended\n".encode())
    return 255
