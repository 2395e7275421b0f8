"""The generated broker config, enforced by a real nats-server: each agent fenced to its id."""

from __future__ import annotations

import asyncio
import stat

import nats
import pytest
from rune.broker_config.generate import generate
from rune.cli.devstack import Stack, free_port

from rune.natsconn import connect
from rune.registry import open_instances_bucket
from rune.subjects import Subjects

S = Subjects()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("broker")
    written = generate(tmp / "conf", ["a1", "b2"])
    stack = Stack(tmp, nats_port=free_port(), nats_conf=str(tmp / "conf" / "nats.conf"))
    stack.start_nats()
    yield stack, tmp / "conf", written
    stack.stop()


async def _as(stack: Stack, conf, name: str, errors: list[str] | None = None,
              inbox: str | None = None) -> nats.NATS:
    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc).lower())

    return await nats.connect(stack.nats_url, nkeys_seed=str(conf / f"{name}.nk"),
                              inbox_prefix=inbox or S.inbox(name), error_cb=on_error,
                              allow_reconnect=False)


async def _wait_for(errors: list[str], text: str) -> bool:
    for _ in range(100):
        if any(text in e for e in errors):
            return True
        await asyncio.sleep(0.02)
    return False


def test_seeds_are_private(broker):
    """Every credential file is mode 0600; nats-server's config holds only public keys."""
    _, conf, written = broker
    seeds = [p for p in written if p.suffix == ".nk"]
    assert {p.name for p in seeds} == {"apiserver.nk", "agent-a1.nk", "agent-b2.nk",
                                       "audit-reader.nk"}
    for path in seeds:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() not in (conf / "auth.conf").read_text()


async def test_anonymous_client_is_refused(broker):
    """Nothing connects to the broker without an nkey."""
    stack, _, _ = broker
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(stack.nats_url, allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=2)


async def test_agent_cannot_read_or_forge_another_agents_session(broker):
    """nats-server refuses a1 subscribing to b2's input and publishing b2's output."""
    stack, conf, _ = broker
    errors: list[str] = []
    a1 = await _as(stack, conf, "agent-a1", errors, S.agent_inbox("a1"))
    api = await connect(stack.nats_url, "apiserver", str(conf / "apiserver.nk"),
                        inbox_prefix=S.inbox("apiserver"))
    try:
        forged = await api.subscribe(S.agent_out_all("b2"))
        await api.flush()
        await a1.subscribe(S.agent_in_all("b2"))
        await a1.subscribe(S.agent_all("b2"))
        await a1.publish(S.session_out("b2", "s1"), b"forged output")
        await a1.flush()
        assert await _wait_for(errors, 'subscription to "rune.in.b2.>"')
        assert await _wait_for(errors, 'subscription to "rune.agent.b2.>"')
        assert await _wait_for(errors, 'publish to "rune.out.b2.s1"')
        # What the apiserver sees of b2 never includes a1's forgery.
        await api.publish(S.session_in("b2", "s1"), b"keystrokes")
        await api.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await forged.next_msg(timeout=0.3)
    finally:
        await a1.close()
        await api.close()


async def test_agent_works_within_its_own_subjects(broker):
    """a1 answers exec requests, streams its output, and writes only its own registry keys."""
    stack, conf, _ = broker
    errors: list[str] = []
    api = await connect(stack.nats_url, "apiserver", str(conf / "apiserver.nk"),
                        inbox_prefix=S.inbox("apiserver"))
    a1 = await _as(stack, conf, "agent-a1", errors, S.agent_inbox("a1"))
    try:
        await open_instances_bucket(api, S)  # the apiserver creates the bucket
        out = await api.subscribe(S.agent_out_all("a1"))

        async def answer(msg: object) -> None:
            await msg.respond(b"opened")

        await a1.subscribe(S.agent_exec("a1"), cb=answer)
        inbox = await a1.subscribe(S.agent_in_all("a1"))
        await a1.flush()
        assert (await api.request(S.agent_exec("a1"), b"open", timeout=2)).data == b"opened"
        await api.publish(S.session_in("a1", "s1"), b"stdin")
        assert (await inbox.next_msg(timeout=2)).data == b"stdin"
        await a1.publish(S.session_out("a1", "s1"), b"stdout")
        assert (await out.next_msg(timeout=2)).data == b"stdout"
        kv = await open_instances_bucket(a1, S)
        await kv.put("a1.default.api-instance-a1-0", b"{}")
        await kv.delete("a1.default.api-instance-a1-0")
        with pytest.raises(Exception):  # noqa: B017 - the put's ack never comes
            await asyncio.wait_for(kv.put("b2.default.api-instance-b2-0", b"{}"), 1.5)
        assert await _wait_for(errors, 'publish to "$kv.rune_instances.b2.default')
        # The agent may not answer with another agent's inbox either.
        await a1.subscribe(S.agent_inbox("b2") + ".>")
        assert await _wait_for(errors, "_inbox_rune.agent.b2")
    finally:
        await a1.close()
        await api.close()


async def test_audit_reader_is_read_only(broker):
    """The audit reader may read audit subjects but publish nothing else."""
    stack, conf, _ = broker
    errors: list[str] = []
    reader = await _as(stack, conf, "audit-reader", errors)
    api = await connect(stack.nats_url, "apiserver", str(conf / "apiserver.nk"),
                        inbox_prefix=S.inbox("apiserver"))
    try:
        sub = await reader.subscribe(S.audit_all())
        await reader.flush()
        await api.publish(S.audit("default", "started"), b"event")
        assert (await sub.next_msg(timeout=2)).data == b"event"
        await reader.publish(S.audit("default", "started"), b"forged")
        await reader.publish(S.agent_exec("a1"), b"open")
        await reader.subscribe(S.agent_in_all("a1"))
        await reader.flush()
        assert await _wait_for(errors, 'publish to "rune.audit.default.started"')
        assert await _wait_for(errors, 'publish to "rune.agent.a1.exec"')
        assert await _wait_for(errors, 'subscription to "rune.in.a1.>"')
    finally:
        await reader.close()
        await api.close()
