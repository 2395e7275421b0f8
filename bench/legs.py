"""Each leg of rune's output path alone, the others replaced by a null sink or a memory source.

    python bench/legs.py [--size-mib 1024] [--only nats,grpc,write]

- nats: agent link → nats-server → apiserver link (rune/link.py both ends, real broker,
  stdout frames of frames.MAX_DATA against credit); the apiserver end consumes into nothing.
- grpc: apiserver → CLI: a StreamExec server writing ExecResponse(stdout=…) from memory,
  the CLI's own ExecStream.events() reading into nothing.
- write: the CLI's output writes (exec_cmd's path) into a pipe that another process drains.

Each sending end runs in a process of its own, as in the real system (two cores).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # `python bench/legs.py`: the repo root holds bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rune import frames  # noqa: E402
from rune.runtime import run as run_loop  # noqa: E402

CHUNK = frames.MAX_DATA
WINDOW = 4 * 1024 * 1024  # the apiserver's default exec window


def _chunks(size: int) -> list[int]:
    full, rest = divmod(size, CHUNK)
    return [CHUNK] * full + ([rest] if rest else [])


# --- nats: link to link over the real broker -------------------------------------------------

async def _nats_send(url: str, size: int) -> None:
    from rune.link import LinkSettings, SessionLink
    from rune.natsconn import connect

    nc = await connect(url, "bench-legs-agent")
    link = SessionLink(nc, "bench.legs.out", "bench.legs.in", frozenset(),
                       LinkSettings(window=WINDOW), peer="apiserver")
    await link.open()
    await nc.flush()
    payload = b"\0" * CHUNK
    view = memoryview(payload)
    for n in _chunks(size):
        data = payload if n == CHUNK else bytes(view[:n])
        await link.send(frames.STDOUT, data, n)
    await link.send(frames.EXIT, {"code": 0, "signal": 0})
    while not link.sender.all_consumed():
        await asyncio.sleep(0.005)
    await link.close()
    await nc.close()


def _nats_sender(url: str, size: int) -> None:
    run_loop(_nats_send(url, size))


async def _nats_receive(url: str, size: int) -> float:
    from rune.link import LinkSettings, SessionLink
    from rune.natsconn import connect

    nc = await connect(url, "bench-legs-apiserver")
    link = SessionLink(nc, "bench.legs.in", "bench.legs.out",
                       frozenset((frames.STDOUT, frames.EXIT)), LinkSettings(window=WINDOW),
                       peer="agent")
    await link.open()
    await nc.flush()
    sender = multiprocessing.get_context("spawn").Process(target=_nats_sender, args=(url, size))
    began = time.perf_counter()
    sender.start()
    got = 0
    while True:
        kind, payload = await link.recv()
        if kind == frames.EXIT:
            break
        got += len(payload)
    await link.flush_ack()
    elapsed = time.perf_counter() - began
    await nc.flush()  # the last ack must leave before the loop blocks in join
    await asyncio.get_running_loop().run_in_executor(None, sender.join, 30)
    await link.close()
    await nc.close()
    if got != size:
        raise RuntimeError(f"nats leg: {got} of {size} bytes")
    return elapsed


def nats_leg(size: int) -> float:
    from rune.cli.devstack import Stack, free_port

    with tempfile.TemporaryDirectory(prefix="rune-legs-") as folder:
        stack = Stack(Path(folder), nats_port=free_port(), api_port=free_port())
        stack.start_nats()
        try:
            return run_loop(_nats_receive(stack.nats_url, size))
        finally:
            stack.stop()


# --- grpc: a memory source behind StreamExec, the CLI's reader ---------------------------------

def _grpc_server(port: int, size: int, ready: object) -> None:
    import grpc

    from rune.proto import exec_pb2 as pb
    from rune.proto import exec_pb2_grpc as pb_grpc

    payload = b"\0" * CHUNK

    class Source(pb_grpc.ExecServiceServicer):
        async def StreamExec(self, requests: object, context: object) -> None:  # noqa: N802
            await context.read()
            await context.write(pb.ExecResponse(started=pb.Started(session_id="legs")))
            for n in _chunks(size):
                await context.write(pb.ExecResponse(stdout=payload if n == CHUNK
                                                    else payload[:n]))
            await context.write(pb.ExecResponse(exit=pb.Exit(code=0)))
            while await context.read() is not grpc.aio.EOF:
                pass

    async def serve() -> None:
        limit = 4 * 1024 * 1024  # the apiserver's default max_message, as it sets it
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit * 2),
                                          ("grpc.max_send_message_length", limit)])
        pb_grpc.add_ExecServiceServicer_to_server(Source(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    run_loop(serve())


async def _grpc_receive(address: str) -> tuple[int, float]:
    from rune.cli.client import ApiClient, ExecOptions

    async with ApiClient(address) as client:
        stream = client.exec_stream()
        began = time.perf_counter()
        await stream.start(ExecOptions(target="legs", command=["produce"]))
        got = 0
        async for kind, payload in stream.events():
            if kind == "stdout":
                got += len(payload)
        return got, time.perf_counter() - began


def grpc_leg(size: int) -> float:
    from rune.cli.devstack import free_port

    port = free_port()
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    server = context.Process(target=_grpc_server, args=(port, size, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("grpc leg: the source server did not start")
        # The CLI runs plain asyncio (see rune/cli/dispatch.py), so this end does too.
        got, elapsed = asyncio.run(_grpc_receive(f"127.0.0.1:{port}"))
    finally:
        server.terminate()
        server.join(10)
    if got != size:
        raise RuntimeError(f"grpc leg: {got} of {size} bytes")
    return elapsed


# --- write: the CLI's output writes into a drained pipe --------------------------------------

async def _write_leg(fd: int, size: int) -> float:
    from rune.cli.exec_cmd import _write_all

    loop = asyncio.get_running_loop()
    payload = b"\0" * CHUNK
    began = time.perf_counter()
    for n in _chunks(size):
        await loop.run_in_executor(None, _write_all, fd, payload if n == CHUNK
                                   else payload[:n])
    return time.perf_counter() - began


def write_leg(size: int) -> float:
    drain = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        elapsed = asyncio.run(_write_leg(drain.stdin.fileno(), size))
    finally:
        drain.stdin.close()
        drain.wait(30)
    return elapsed


LEGS = {"nats": nats_leg, "grpc": grpc_leg, "write": write_leg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--only", default=",".join(LEGS))
    args = parser.parse_args()
    size = args.size_mib << 20
    for name in [n for n in args.only.split(",") if n]:
        elapsed = LEGS[name](size)
        print(f"{name:6s} {size / elapsed / 1e6:8.1f} MB/s  ({elapsed:.2f} s for "
              f"{args.size_mib} MiB)", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
