"""The multiplexer: one per user, keeping gRPC channels to the apiservers warm.

A `rune` client connects to its Unix socket and passes its argv, cwd, the
environment rune reads and its stdin, stdout and stderr; the multiplexer runs the
very command code of an in-process run (`rune.cli.dispatch.execute`) on those
descriptors, delivers the signals the client relays, and sends the exit status.
It exits after RUNE_MUX_IDLE seconds (default 600) without a session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
import time
import traceback

from rune.cli import muxwire
from rune.cli.version import build_id

STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RETIRE_AFTER = 10.0  # seconds a finished session's descriptors stay parked on /dev/null


def _log(line: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} rune-mux[{os.getpid()}]: {line}\n")
    sys.stderr.flush()


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock)


def _retire(fds: list[int]) -> None:
    """Lets go of a client's descriptors without handing their numbers on too soon.

    A write still under way on a worker thread (a session cut short) would otherwise
    land on whatever the next client's descriptor gets the same number: each number
    first points at /dev/null, and is closed a while later.
    """
    if not fds:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
    finally:
        os.close(null)

    def close() -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    asyncio.get_running_loop().call_later(RETIRE_AFTER, close)


class Mux:
    def __init__(self, folder: str, idle: float) -> None:
        self.folder = folder
        self.path = muxwire.socket_path(folder)
        self.idle = idle
        self.version = build_id()
        self.pool = None  # the warm channels: made in serve(), grpc loads after listen()
        self.sessions: set[asyncio.Task] = set()
        self.last_used = time.monotonic()
        self.started = time.time()
        self.stopping: asyncio.Event | None = None  # made on the loop, in serve()
        self._listener: socket.socket | None = None
        self._inode = 0

    # --- lifetime -------------------------------------------------------------------------

    def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket: its multiplexer no longer answers
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_mask = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_mask)
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._inode = os.stat(self.path).st_ino
        with open(muxwire.pid_path(self.folder), "w") as handle:
            handle.write(f"{os.getpid()}\n")

    def step_aside(self) -> None:
        """Stops taking connections (the sessions running go on) and frees the socket path."""
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
                os.unlink(muxwire.pid_path(self.folder))
        except FileNotFoundError:
            pass

    async def serve(self) -> None:
        from rune.cli.client import ChannelPool

        self.pool = ChannelPool(keep=True)
        self.stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in STOPPING_SIGNALS:
            loop.add_signal_handler(signum, self.stopping.set)
        accepting = asyncio.create_task(self._accept())
        watching = asyncio.create_task(self._watch_idle())
        await self.stopping.wait()
        _log("stopping")
        self.step_aside()
        accepting.cancel()
        watching.cancel()
        for task in list(self.sessions):
            task.cancel()
        await asyncio.gather(*self.sessions, return_exceptions=True)
        await self.pool.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while self._listener is not None:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError:
                if self._listener is None:
                    return
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._connection(conn))
            self.sessions.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        self.sessions.discard(task)
        self.last_used = time.monotonic()
        if self._listener is None and not self.sessions:
            self.stopping.set()  # stepped aside and the last session is over

    async def _watch_idle(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle, 5.0) or 0.5)
            if not self.sessions and time.monotonic() - self.last_used >= self.idle:
                _log(f"idle for {self.idle:g}s: exiting")
                self.stopping.set()
                return

    # --- one connection ---------------------------------------------------------------------

    async def _connection(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        fds: list[int] = []
        try:
            if muxwire.peer_uid(conn) != os.getuid():
                _log("refused a connection from another user")
                return
            message, fds, reader = await self._first(conn)
            kind = message.get("t")
            if kind == "status":
                await self._send(conn, self.status())
            elif kind == "stop":
                await self._send(conn, {"t": "stopping", "pid": os.getpid()})
                self.stopping.set()
            elif kind == "hello":
                await self._session(conn, message, fds, reader)
        except (OSError, ValueError) as exc:
            _log(f"connection dropped: {exc}")
        finally:
            _retire(fds)
            conn.close()

    async def _first(self, conn: socket.socket) -> tuple[dict, list[int], muxwire.Reader]:
        """The first message and the descriptors that came with it."""
        reader = muxwire.Reader()
        fds: list[int] = []
        while True:
            await _readable(conn)
            try:
                data, received, _flags, _addr = socket.recv_fds(conn, 65536, 3)
            except BlockingIOError:
                continue
            fds += received
            if not data:
                raise ValueError("the client left before saying what to run")
            messages = reader.feed(data)
            if messages:
                return messages[0], fds, reader

    async def _send(self, conn: socket.socket, message: dict) -> None:
        await asyncio.get_running_loop().sock_sendall(conn, muxwire.encode(message))

    def status(self) -> dict:
        return {"t": "status", "pid": os.getpid(), "version": self.version,
                "started": self.started, "idle_timeout": self.idle,
                "sessions": max(0, len(self.sessions) - 1), "channels": len(self.pool),
                "socket": self.path}

    async def _session(self, conn: socket.socket, hello: dict, fds: list[int],
                       reader: muxwire.Reader) -> None:
        if hello.get("version") != self.version:
            _log(f"a client of install {hello.get('version')} asked; this is {self.version}: "
                 "stepping aside")
            self.step_aside()
            await self._send(conn, {"t": "refused", "reason": "version"})
            return
        if len(fds) != 3:
            await self._send(conn, {"t": "refused", "reason": "expected 3 descriptors"})
            return
        from rune.cli import dispatch
        from rune.cli.invocation import Invocation, RelayedSignals

        signals = RelayedSignals()
        inv = Invocation(argv=[str(a) for a in hello.get("argv", [])],
                         env={str(k): str(v) for k, v in dict(hello.get("env", {})).items()},
                         cwd=str(hello.get("cwd") or "/"), stdin=fds[0], stdout=fds[1],
                         stderr=fds[2], signals=signals, channels=self.pool, in_mux=True)
        await self._send(conn, {"t": "accepted", "pid": os.getpid()})
        job = asyncio.create_task(dispatch.execute(inv))
        relay = asyncio.create_task(self._relay(conn, reader, signals, job))
        await asyncio.wait({job, relay}, return_when=asyncio.FIRST_COMPLETED)
        if not job.done():
            # The client went away: end its session as an in-process `rune` dying would.
            job.cancel()
        code = await self._status_of(job, inv)
        relay.cancel()
        # Nothing may stay buffered for descriptors whose numbers the next client reuses.
        inv.close()
        with contextlib.suppress(OSError):
            await self._send(conn, {"t": "exit", "code": code})

    async def _status_of(self, job: asyncio.Task, inv: object) -> int:
        try:
            return int(await job)
        except asyncio.CancelledError:
            interrupted = getattr(job, "interrupted", None)
            if interrupted == 130:
                from rune.cli.dispatch import error_line

                return error_line(inv, "interrupted", 130)  # as KeyboardInterrupt in-process
            return interrupted or 255
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # a bug: one line for the user, the trace in the log
            _log("".join(traceback.format_exception(exc)))
            from rune.cli.dispatch import error_line

            return error_line(inv, f"internal error in the multiplexer: {exc}", 255)

    async def _relay(self, conn: socket.socket, reader: muxwire.Reader,
                     signals: object, job: asyncio.Task) -> None:
        """Delivers the client's signals; returns when the client is gone."""
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(conn, 4096)
            if not data:
                return
            for message in reader.feed(data):
                if message.get("t") != "signal":
                    continue
                signum = int(message.get("n", 0))
                handled = signals.deliver(signum)
                if signum == signal.SIGTSTP:
                    await self._send(conn, {"t": "suspended"})
                elif not handled and signum in STOPPING_SIGNALS:
                    # No session handles it (a listing, a parse): end as the process would.
                    job.interrupted = 130 if signum == signal.SIGINT else 128 + signum
                    job.cancel()


def _warm_up() -> None:
    """Builds the whole command tree once the first session is under way (not before it:
    a first `rune exec` waits for this process to listen, not for what it may need later)."""
    from rune.cli import dispatch

    dispatch._command(full=False)
    dispatch._command(full=True)
    # What is loaded now lives as long as the process: keep it out of every collection.
    gc.freeze()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rune mux serve", description=__doc__)
    parser.add_argument("--dir", help="socket directory (default: as the client finds it)")
    parser.add_argument("--ready-fd", type=int, default=-1,
                        help="descriptor to write 'ready' to once listening")
    args = parser.parse_args(argv)
    folder = muxwire.private_dir(args.dir or muxwire.mux_dir(os.environ))
    idle = float(os.environ.get("RUNE_MUX_IDLE") or muxwire.DEFAULT_IDLE)
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    os.chdir("/")  # commands resolve paths against their client's cwd, never ours
    mux = Mux(folder, idle)
    mux.listen()
    _log(f"listening on {mux.path} (install {mux.version}, idle timeout {idle:g}s)")
    if args.ready_fd >= 0:
        os.write(args.ready_fd, b"ready\n")  # connections wait in the backlog meanwhile
        os.close(args.ready_fd)

    async def run() -> None:
        asyncio.get_running_loop().call_later(0.5, _warm_up)
        await mux.serve()

    # Plain asyncio: the descriptors it is given are shared with the clients' shells.
    asyncio.run(run())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
