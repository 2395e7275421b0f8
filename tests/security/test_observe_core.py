"""Observers are sessions of the one core, against a real secured stack: admitted with verb
`observe` (denials audited), counted against max_sessions_per_user, listed, killable, and
released on every way out (kill, client cancel, the observed session ending)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc
from tests.security import test_session_core as core
from tests.security.test_session_core import MAX_PER_USER, assert_healthy, secure_stack


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    yield from secure_stack(tmp_path_factory)


TICKING = ["sh", "-c", "while :; do echo tick; sleep 0.2; done"]


async def cli(*args, **kwargs):
    return await asyncio.to_thread(core.cli, *args, **kwargs)


async def audit(stack) -> list[dict]:
    return await asyncio.to_thread(core.audit, stack)


async def wait_audit(*args, **kwargs) -> list[dict]:
    return await asyncio.to_thread(core.wait_audit, *args, **kwargs)


def metadata(stack, user: str = "admin") -> tuple:
    return (("authorization", f"Bearer {stack.token_files[user].read_text().strip()}"),)


async def open_exec(channel: grpc.aio.Channel, stack, argv: list[str]) -> tuple[object, str]:
    call = pb_grpc.ExecServiceStub(channel).StreamExec(metadata=metadata(stack))
    await call.write(pb.ExecRequest(init=pb.ExecInit(target="api", command=argv)))
    first = await call.read()
    assert first.WhichOneof("msg") == "started", first
    return call, first.started.session_id


def observe(channel: grpc.aio.Channel, stack, session_id: str, user: str = "admin"):
    return pb_grpc.ExecServiceStub(channel).ObserveSession(
        pb.ObserveRequest(session_id=session_id), metadata=metadata(stack, user))


async def observers_of(channel: grpc.aio.Channel, stack, session_id: str) -> list[str]:
    reply = await pb_grpc.ExecServiceStub(channel).ListSessions(
        pb.ListSessionsRequest(active_only=True, all_namespaces=True),
        metadata=metadata(stack))
    return [s.session_id for s in reply.sessions
            if list(s.command) == ["rune-observe", session_id]]


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def test_an_observer_without_the_verb_is_denied_and_audited(secure):
    """`dev` (no `observe`) is PERMISSION_DENIED, audited session.denied; the stack lives."""
    async with grpc.aio.insecure_channel(secure.api_address) as channel:
        call, session_id = await open_exec(channel, secure, ["sleep", "30"])
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in observe(channel, secure, session_id, user="dev"):
                    pass
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert not await observers_of(channel, secure, session_id)
        finally:
            call.cancel()
    denied = await wait_audit(secure, lambda e: e["event"] == "session.denied"
                        and e.get("argv") == ["rune-observe", session_id], "observe denied")
    assert denied[0]["user"] == "dev" and denied[0]["code"] == "permission_denied"
    assert denied[0]["namespace"] == "default"
    await asyncio.to_thread(assert_healthy, secure)


async def test_observing_an_unknown_or_malformed_session_is_refused(secure):
    """An unknown id is NOT_FOUND, a malformed one INVALID_ARGUMENT; both audited denied."""
    async with grpc.aio.insecure_channel(secure.api_address) as channel:
        for session_id, code in (("f" * 32, grpc.StatusCode.NOT_FOUND),
                                 ("x\n>", grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in observe(channel, secure, session_id):
                    pass
            assert info.value.code() == code, info.value
    await wait_audit(secure, lambda e: e["event"] == "session.denied"
               and e.get("argv") == ["rune-observe", "f" * 32], "unknown session denied")


async def test_observers_are_sessions_counted_listed_killed_and_released(secure):
    """Observers count against max_sessions_per_user, show in `sessions list`, end on
    `sessions kill` (audited), on client cancel and when the observed session ends."""
    async with grpc.aio.insecure_channel(secure.api_address) as channel:
        call, watched = await open_exec(channel, secure, TICKING)  # admin's 1st session
        observers: dict[str, object] = {}
        try:
            for _ in range(MAX_PER_USER - 1):
                stream = observe(channel, secure, watched)
                chunk = await stream.read()  # live output: it is registered by now
                assert chunk.data, chunk
                new = set(await observers_of(channel, secure, watched)) - set(observers)
                assert len(new) == 1
                observers[new.pop()] = stream
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in observe(channel, secure, watched):
                    pass
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            listing = await cli(secure, "sessions", "list")
            assert listing.stdout.decode().count(f"rune-observe {watched}") == MAX_PER_USER - 1
            ids = list(observers)
            observed = await wait_audit(secure, lambda e: e["event"] == "session.observed"
                                        and e.get("observer_session_id") in ids, "observed")
            assert observed[0]["session_id"] == watched  # about the watched session
            assert observed[0]["kind"] == "observe" and observed[0]["user"] == "admin"

            victim = ids[0]
            killed = await cli(secure, "sessions", "kill", victim, "--reason", "drill")
            assert killed.returncode == 0, killed.stderr
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while True:
                    await observers[victim].read()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "session ended by admin: drill" in info.value.details()
            events = await wait_audit(secure, lambda e: e.get("session_id") == victim and
                                e["event"] in ("session.killed", "session.failed"), "kill")
            deadline = time.monotonic() + 5
            while len(events) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                events = [e for e in await audit(secure) if e.get("session_id") == victim and
                          e["event"] in ("session.killed", "session.failed")]
            assert sorted(e["event"] for e in events) == ["session.failed", "session.killed"]

            cancelled = ids[1]
            observers[cancelled].cancel()
            await until(lambda: _gone(channel, secure, watched, cancelled),
                        "a cancelled observer is released")
            await wait_audit(secure, lambda e: e.get("session_id") == cancelled
                       and e["event"] == "session.failed", "cancelled observer ended")

            # Room for one more again: the killed and the cancelled ones were released.
            again = observe(channel, secure, watched)
            assert (await again.read()).data
            observers["again"] = again
        finally:
            call.cancel()
        rest = [s for key, s in observers.items() if key not in ids[:2]]
        for stream in rest:  # the observed session ended: each observer is told, then ends
            last = None
            while (chunk := await stream.read()) is not grpc.aio.EOF:
                last = chunk
            assert last is not None and last.ended
        await until(lambda: _none(channel, secure, watched), "no observer left")
    deadline = time.monotonic() + 5
    while True:
        ended = [e for e in await audit(secure) if e["event"] == "session.ended"
                 and e.get("observed_session_id") == watched]
        if len(ended) == len(rest) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert len(ended) == len(rest)
    await asyncio.to_thread(assert_healthy, secure)


async def _gone(channel, stack, watched: str, observer: str) -> bool:
    return observer not in await observers_of(channel, stack, watched)


async def _none(channel, stack, watched: str) -> bool:
    return not await observers_of(channel, stack, watched)
