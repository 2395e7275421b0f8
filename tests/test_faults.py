"""Faults injected into a real stack: kill -9 a part, restart nats-server, block a reader,
publish garbage, leave a session idle. Each test asserts the outcome, the exit code, the
time bound and, where output flows, the sha256 of what arrived.

The stacks here beat every HB seconds and declare a peer lost after LOST_AFTER silent
intervals; every figure measured is printed (run with -s to see them).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import msgpack
import pytest
from conftest import Rune, start_stack
from faultkit import (
    Session,
    count_lines,
    expected_sha,
    generator_script,
    kill9,
    pids_with,
    publish,
    rss_kib,
    wait_for,
)

from rune import frames

HB = 0.5
LOST_AFTER = 3
KILL_GRACE = 1.0
LOST = HB * LOST_AFTER
# Slack above the protocol's bound for process exit, a 50 ms tick and a loaded 2-core box.
SLACK = 1.0
EXIT_SLACK = 0.5  # the CLI's own teardown, for bounds stated in intervals
API = {"heartbeat": HB, "lost_after": LOST_AFTER}
AGENT = {"kill_grace": KILL_GRACE}
SLEEPER = [{"name": "api", "namespace": "default", "replicas": 1,
            "command": ["sh", "-c", "exec sleep 2147483647"]}]


def figure(name: str, value: str) -> None:
    print(f"\nFIGURE {name}: {value}")


def marker(tag: str) -> str:
    return f"rune-fault-{tag}-{os.getpid()}-{time.monotonic_ns()}"


def sleeper_argv(mark: str, trap_hup: str = "") -> list[str]:
    """A remote command that says 'started' then sleeps; `mark` finds it on the host."""
    body = (f"trap '{trap_hup}' HUP; " if trap_hup else "") + \
        "echo started; while :; do sleep 0.1; done"
    return ["sh", "-c", body, mark]


@pytest.fixture
def fresh(tmp_path):
    """A stack of its own for a test that breaks it."""
    stack = start_stack(tmp_path, agents={"a1": SLEEPER}, api_extra=API, agent_extra=AGENT)
    yield stack, Rune(stack)
    stack.stop()


@pytest.fixture(scope="module")
def calm(tmp_path_factory):
    """A shared stack for faults that leave it standing."""
    stack = start_stack(tmp_path_factory.mktemp("calm"), agents={"a1": SLEEPER},
                        api_extra=API, agent_extra=AGENT)
    yield stack, Rune(stack)
    stack.stop()


def _started(session: Session) -> None:
    wait_for(lambda: session.head.startswith(b"started"), 20, "remote command started")


def test_idle_session_survives_on_heartbeats_both_ways(calm):
    """An idle session outlives many intervals: both ends beat, on the wire, every HB."""
    stack, rune = calm
    seen = {"in": 0, "out": 0}

    import asyncio

    import nats

    async def watch() -> subprocess.CompletedProcess:
        nc = await nats.connect(stack.nats_url)

        async def count(msg: object) -> None:
            if frames.decode(msg.data)[0] == frames.HEARTBEAT:
                seen["in" if ".in." in msg.subject else "out"] += 1

        await nc.subscribe("rune.in.a1.*", cb=count)
        await nc.subscribe("rune.out.a1.*", cb=count)
        result = await asyncio.to_thread(rune, "exec", "api", "sleep", str(8 * HB))
        await nc.close()
        return result

    result = asyncio.run(watch())
    assert result.returncode == 0, result.stderr
    # 8 intervals of silence: each side beat several times and nobody was declared lost.
    assert seen["in"] >= 4 and seen["out"] >= 4, seen


def test_agent_killed_mid_session(fresh):
    """kill -9 of the agent: 'Error: … agent a1 lost …', exit 255 within 3 intervals;
    its instances show and resolve as lost; the command it ran dies with it."""
    stack, rune = fresh
    mark = marker("agent")
    session = Session(rune, "api", "sh", "-c", "echo started; exec sleep 600", mark)
    _started(session)
    assert pids_with(mark)
    killed = kill9(stack, "agent-a1")
    code = session.wait(timeout=LOST + SLACK + 10)
    elapsed = time.monotonic() - killed
    figure("agent kill -9 -> CLI exit", f"{elapsed:.2f}s (HB {HB}s x {LOST_AFTER})")
    assert code == 255
    assert re.match(r"Error: agent a1 lost: no heartbeat for [0-9.]+s and no longer "
                    r"connected to the broker; the session ended$",
                    session.errors()[0]), session.stderr_text
    assert elapsed <= LOST + EXIT_SLACK
    wait_for(lambda: not pids_with(mark), 5, "the exec'd command died with its agent")

    def lost_in_listing() -> bool:
        rows = [line.split() for line in rune("instances").stdout.decode().splitlines()[1:]]
        return bool(rows) and all(row[3] == "lost" for row in rows)

    took = wait_for(lost_in_listing, 5, "instances listed as lost")
    figure("agent kill -9 -> registry shows lost", f"{time.monotonic() - killed:.2f}s")
    assert took is not None
    refused = rune("exec", "api-instance-a1-0", "true")
    assert refused.returncode == 255
    assert "not running" in refused.stderr.decode() and "lost" in refused.stderr.decode()
    assert rune("exec", "api", "true").returncode == 255


def test_agent_stopped_mid_session_says_so(fresh):
    """SIGTERM to the agent: the CLI hears at once that it is shutting down; no orphan."""
    stack, rune = fresh
    mark = marker("stop")
    session = Session(rune, "api", *sleeper_argv(mark))
    _started(session)
    os.kill(stack.procs["agent-a1"].pid, signal.SIGTERM)
    stopped = time.monotonic()
    code = session.wait(timeout=10)
    figure("agent SIGTERM -> CLI exit", f"{time.monotonic() - stopped:.2f}s")
    assert code == 255
    assert session.errors() == ["Error: agent a1 is shutting down"], session.stderr_text
    assert time.monotonic() - stopped <= LOST + SLACK
    wait_for(lambda: not pids_with(mark), KILL_GRACE + SLACK, "remote command gone")


def test_lost_agent_comes_back(fresh):
    """An agent that beats again after a restart is running again in the registry."""
    stack, rune = fresh
    kill9(stack, "agent-a1")
    wait_for(lambda: "lost" in rune("instances").stdout.decode(), 10, "agent marked lost")
    stack.start_agent("a1", SLEEPER, AGENT, wait_running=1)
    assert rune("exec", "api", "echo", "back").stdout == b"back\n"


@pytest.mark.parametrize("ignores_hup", [False, True])
def test_cli_killed_stops_the_remote_command(fresh, ignores_hup):
    """kill -9 of the CLI: the agent sends SIGHUP, then SIGKILL after the grace; no orphan."""
    stack, rune = fresh
    mark = marker("cli")
    hup_file = stack.state_dir / f"hup-{mark}"
    trap = f"echo HUP >> {hup_file}" if ignores_hup else f"echo HUP >> {hup_file}; exit 129"
    session = Session(rune, "api", *sleeper_argv(mark, trap))
    _started(session)
    assert pids_with(mark)
    os.kill(session.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    gone = wait_for(lambda: not pids_with(mark), KILL_GRACE + LOST + SLACK + 2,
                    "remote command gone")
    figure(f"CLI kill -9 -> remote command gone (ignores HUP: {ignores_hup})",
           f"{time.monotonic() - killed:.2f}s")
    assert hup_file.read_text().startswith("HUP"), "SIGHUP came first"
    if ignores_hup:
        assert gone >= KILL_GRACE * 0.8, "SIGKILL only after the grace period"
    else:
        assert gone <= LOST + SLACK
    assert rune("exec", "api", "echo", "ok").stdout == b"ok\n"


def test_apiserver_killed(fresh):
    """kill -9 of the apiserver: the CLI exits 255 at once with a clear UNAVAILABLE line;
    the agent notices the silence and stops the command within 3 intervals."""
    stack, rune = fresh
    mark = marker("api")
    session = Session(rune, "api", *sleeper_argv(mark))
    _started(session)
    killed = kill9(stack, "apiserver")
    code = session.wait(timeout=10)
    cli_took = time.monotonic() - killed
    gone = wait_for(lambda: not pids_with(mark), LOST + KILL_GRACE + SLACK + 2,
                    "remote command gone")
    figure("apiserver kill -9 -> CLI exit", f"{cli_took:.2f}s")
    figure("apiserver kill -9 -> remote command gone", f"{gone:.2f}s")
    assert code == 255
    assert session.errors()[0].startswith("Error: lost the connection to the API server"), \
        session.stderr_text
    assert cli_took <= SLACK
    assert gone <= LOST + SLACK
    log = stack.logs / "agent-a1.log"
    assert count_lines(log, "apiserver lost") >= 1


@pytest.mark.parametrize("outage", [0.0, 2 * LOST])
def test_broker_restart_mid_stream_is_invisible(fresh, outage):
    """nats-server killed and restarted on its port mid-stream (at once, and after an outage
    longer than the loss bound): byte-exact output; exec, the registry and new agents work."""
    stack, rune = fresh
    blocks = 600  # 37.5 MiB, paced so the stream spans the restart
    session = Session(rune, "api", "python3", "-c", generator_script(blocks, pause=0.005))
    wait_for(lambda: session.received > 4 * 2**20, 30, "stream flowing")
    killed = kill9(stack, "nats")
    at_kill = session.received
    time.sleep(outage)  # the outage itself, not a wait for readiness
    stack.start_nats()
    restarted = time.monotonic()
    wait_for(lambda: session.received > at_kill + 2**20, 30, "stream flowing again")
    now = time.monotonic()
    code = session.wait(timeout=60)
    figure(f"broker kill -9, {outage:g}s outage, restart -> stream flowing again",
           f"{now - killed:.2f}s after the kill, {now - restarted:.2f}s after nats-server "
           "was back")
    assert at_kill < blocks * 64 * 1024, "the restart fell inside the stream"
    assert code == 0, session.stderr_text
    assert session.received == blocks * 64 * 1024
    assert session.digest.hexdigest() == expected_sha(blocks)
    assert count_lines(stack.logs / "apiserver.log", "disconnected") >= 1
    assert rune("exec", "api", "echo", "after").stdout == b"after\n"
    # The registry watch survived: an agent started after the restart shows up.
    stack.start_agent("a2", SLEEPER, AGENT, wait_running=1)
    assert rune("exec", "api-instance-a2-0", "echo", "a2").stdout == b"a2\n"


def test_slow_reader_blocks_the_remote_for_30s(calm):
    """The CLI's stdout blocked 30 s: the remote blocks on write, the servers' memory
    stays bounded by the window, then every byte arrives."""
    stack, rune = calm
    blocks = 1024  # 64 MiB
    progress = stack.state_dir / f"progress-{marker('slow')}"
    pids = [stack.procs["apiserver"].pid, stack.procs["agent-a1"].pid]
    before = [rss_kib(p) for p in pids]
    session = Session(rune, "api", "python3", "-c",
                      generator_script(blocks, progress=str(progress)), read=False)
    written = lambda: int(progress.read_text() or 0) if progress.exists() else 0  # noqa: E731
    wait_for(lambda: written() > 0, 20, "remote writing")
    peaks = list(before)
    samples = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        peaks = [max(p, rss_kib(pid)) for p, pid in zip(peaks, pids, strict=True)]
        samples.append(written())
        time.sleep(0.5)
    # Blocked: nothing more written over the last 20 s, and far from all of it.
    assert samples[-1] == samples[len(samples) // 3], samples
    assert samples[-1] * 64 * 1024 < 32 * 2**20
    session.start_reading()
    assert session.wait(timeout=120) == 0, session.stderr_text
    assert session.digest.hexdigest() == expected_sha(blocks)
    figure("slow reader: blocks written while blocked", f"{samples[-1]} x 64 KiB")
    figure("slow reader: peak RSS apiserver / agent",
           f"{peaks[0] / 1024:.1f} / {peaks[1] / 1024:.1f} MiB (before "
           f"{before[0] / 1024:.1f} / {before[1] / 1024:.1f} MiB)")
    for base, peak in zip(before, peaks, strict=True):
        assert peak - base < 64 * 1024, f"RSS grew by {peak - base} KiB"


def _garbage(prefix_in: str, prefix_out: str) -> list[tuple[str, bytes]]:
    big = frames.encode(frames.STDOUT, 10**6, b"x" * (frames.MAX_DATA + 1))
    shapes = [
        b"\xc1\xff garbage",  # not msgpack
        msgpack.packb({"kind": 1}),  # msgpack, wrong shape
        msgpack.packb([99, 1, b"?"]),  # unknown kind
        msgpack.packb([frames.STDOUT, -4, b"neg"]),  # bad sequence
        msgpack.packb([frames.STDOUT, 1, "text, not bytes"]),
        frames.encode(frames.STDOUT, 1, b"STALE"),  # stale sequence numbers
        frames.encode(frames.STDERR, 1, b"STALE"),
        frames.encode(frames.EXIT, 1, {"code": 99, "signal": 0}),
        frames.encode(frames.ERROR, 1, {"code": "internal", "message": "forged"}),
        frames.encode(frames.STDIN, 1, b"STALE"),
        frames.encode(frames.STDOUT, 10**9, b"FUTURE"),  # far ahead: a gap, dropped
        frames.encode(frames.ACK, 0, "not a list"),
        frames.encode(frames.ACK, 0, [-1, -1]),
        frames.encode(frames.HEARTBEAT, 0, None),
        big,  # oversized data frame
    ]
    messages = []
    for _ in range(40):
        for data in shapes:
            messages += [(prefix_in, data), (prefix_out, data)]
    return messages


def test_garbage_on_the_bus_changes_no_byte(calm):
    """Malformed, unknown, oversized, stale and misaddressed frames are dropped and logged
    (rate-limited): the live session stays byte-exact and nothing crashes."""
    stack, rune = calm
    blocks = 160  # 10 MiB, paced over about 3 s
    session = Session(rune, "api", "python3", "-c", generator_script(blocks, pause=0.02))
    sid = session.session_id()
    wait_for(lambda: session.received > 2**20, 20, "stream flowing")
    messages = _garbage(f"rune.in.a1.{sid}", f"rune.out.a1.{sid}")
    messages += _garbage("rune.in.a1.nosuchsession", "rune.out.a1.nosuchsession")
    messages += [("rune.out.a1._alive", b"\xc1"), ("rune.agent.a1.exec", b"\xc1"),
                 ("rune.agent.a1.exec", msgpack.packb({"session_id": "x"}))] * 20
    publish(stack.nats_url, messages)
    assert session.wait(timeout=60) == 0, session.stderr_text
    assert session.received == blocks * 64 * 1024
    assert session.digest.hexdigest() == expected_sha(blocks)
    for name in ("apiserver", "agent-a1"):
        assert stack.procs[name].poll() is None, f"{name} died"
        dropped = count_lines(stack.logs / f"{name}.log", "dropped")
        figure(f"garbage: 'dropped' log lines in {name}", f"{dropped} for {len(messages)} msgs")
        assert 1 <= dropped <= 60, dropped
    assert rune("exec", "api", "echo", "still fine").stdout == b"still fine\n"


@pytest.fixture(scope="module")
def idle(tmp_path_factory):
    """A stack whose sessions end after 1.5 s without I/O."""
    stack = start_stack(tmp_path_factory.mktemp("idle"), agents={"a1": SLEEPER},
                        api_extra={**API, "idle_timeout": 1.5}, agent_extra=AGENT)
    yield stack, Rune(stack)
    stack.stop()


def test_idle_timeout_ends_a_silent_session(idle):
    """No I/O for the idle timeout: exit 254, its own message, the command is stopped."""
    stack, rune = idle
    mark = marker("idle")
    session = Session(rune, "api", "sh", "-c", "sleep 600", mark)
    session.session_id()
    start = time.monotonic()
    code = session.wait(timeout=30)
    took = time.monotonic() - start
    figure("idle timeout 1.5 s: session start -> CLI exit", f"{took:.2f}s")
    assert code == 254
    assert session.errors() == ["Error: session idle: no input or output for 1.5s (the "
                                "server's idle timeout); the remote command was stopped"]
    assert 1.5 * 0.9 <= took <= 1.5 + SLACK
    wait_for(lambda: not pids_with(mark), KILL_GRACE + SLACK + 2, "idle command stopped")


def test_idle_timeout_spares_a_talking_session(idle):
    """A session whose output keeps flowing outlives the idle timeout."""
    _, rune = idle
    result = rune("exec", "api", "sh", "-c", "for i in 1 2 3 4 5 6; do echo $i; sleep 0.6; done")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"1\n2\n3\n4\n5\n6\n"
