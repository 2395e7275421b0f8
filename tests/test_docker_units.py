"""The Docker runner's parts that need no engine: demultiplexing, exit codes, the CI gate."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT
from rune.agent.runners.docker import derived_instance_id
from rune.agent.runners.docker_exec import short_reason, start_failure_code
from rune.agent.runners.engine_api import EngineError, parse_head, read_response
from rune.agent.runners.engine_stream import HEADER, HIGH_WATER, ExecStream

UPGRADED = b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n" \
           b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n"


def _frames(*parts: tuple[int, bytes]) -> bytes:
    return b"".join(HEADER.pack(stream, len(data)) + data for stream, data in parts)


class _Transport:
    """What ExecStream asks of its transport, recorded."""

    def __init__(self) -> None:
        self.paused = False
        self.closed = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def _deliver(stream: ExecStream, wire: bytes, piece: int) -> None:
    """Hands WIRE to the protocol as the loop would, at most PIECE bytes per read."""
    while wire:
        buffer = stream.get_buffer(-1)
        n = min(len(buffer), piece, len(wire))
        buffer[:n] = wire[:n]
        stream.buffer_updated(n)
        wire = wire[n:]


async def _drain(output, n: int = 1 << 20) -> bytes:
    parts = []
    while data := await output.read(n):
        parts.append(data)
    return b"".join(parts)


def test_demux_keeps_streams_apart_across_any_split():
    """Frames cut at any byte boundary, head included, still give the exact stdout and stderr."""
    wire = UPGRADED + _frames((1, b"hello "), (2, b"oops"), (1, b"world"), (1, b""),
                              (3, b"engine says"), (9, b"unknown id"), (2, b"!" * 70000))

    async def run(piece: int) -> None:
        stream = ExecStream(tty=False)
        stream.connection_made(_Transport())
        _deliver(stream, wire, piece)
        stream.connection_lost(None)
        assert stream.started.done()
        assert await _drain(stream.stdout, 3) == b"hello world"
        assert await _drain(stream.stderr) == b"oops" + b"engine says" + b"!" * 70000

    for piece in (1, 5, 7, 8, 9, 997, 65536, 1 << 20):
        asyncio.run(run(piece))


def test_tty_stream_is_raw_and_error_status_fails_the_start():
    """With a TTY the bytes after the upgrade are output as they are; a 409 is an error."""
    async def run() -> None:
        stream = ExecStream(tty=True)
        stream.connection_made(_Transport())
        _deliver(stream, UPGRADED + HEADER.pack(1, 5) + b"raw", 4)
        stream.connection_lost(None)
        assert await _drain(stream.stdout) == HEADER.pack(1, 5) + b"raw"
        refused = ExecStream(tty=False)
        transport = _Transport()
        refused.connection_made(transport)
        body = b'{"message":"container abc is not running"}'
        _deliver(refused, b"HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body, 20)
        with pytest.raises(EngineError) as caught:
            await refused.started
        assert caught.value.status == 409 and "not running" in caught.value.explanation
        assert transport.closed

    asyncio.run(run())


def test_unread_output_pauses_the_engine_connection():
    """Past the high-water mark reading stops (the command blocks); draining resumes it."""
    async def run() -> None:
        stream = ExecStream(tty=False)
        transport = _Transport()
        stream.connection_made(transport)
        chunk = _frames((1, b"x" * 60000))
        _deliver(stream, UPGRADED, 1 << 20)
        while not transport.paused:
            _deliver(stream, chunk, 1 << 20)
        assert stream.stdout.size > HIGH_WATER
        while transport.paused:
            assert await stream.stdout.read(1 << 20)
        assert not transport.paused

    asyncio.run(run())


def test_engine_responses_with_length_chunks_or_neither():
    """Responses are read whole: Content-Length, chunked, or to EOF (then not kept alive)."""
    async def parse(raw: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_response(reader)

    async def run() -> None:
        response, kept = await parse(b"HTTP/1.1 201 Created\r\nContent-Length: 10\r\n\r\n"
                                     b'{"Id":"x"}')
        assert response.status == 201 and kept and response.body == b'{"Id":"x"}'
        response, kept = await parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"3\r\n{\"a\r\n5;x=y\r\n\":1}\n\r\n0\r\n\r\n")
        assert response.json() == {"a": 1} and kept
        response, kept = await parse(b"HTTP/1.0 200 OK\r\n\r\nto the end")
        assert response.body == b"to the end" and not kept

    asyncio.run(run())
    assert parse_head(b"HTTP/1.1 101 UPGRADED\r\nUpgrade: tcp") == (101, {"upgrade": "tcp"})
    with pytest.raises(ConnectionError):
        parse_head(b"SSH-2.0-OpenSSH\r\n")


def test_start_failures_map_to_shell_codes():
    """A missing command is 127; a file without the execute bit or a bad workdir is 126."""
    prefix = "OCI runtime exec failed: exec failed: unable to start container process: "
    missing = prefix + 'exec: "nope": executable file not found in $PATH: unknown'
    assert start_failure_code(short_reason(missing)) == 127
    assert short_reason(missing) == 'exec: "nope": executable file not found in $PATH'
    assert start_failure_code(prefix + 'exec: "/no/such": no such file or directory') == 127
    assert start_failure_code(prefix + 'exec: "/etc/passwd": permission denied: unknown') == 126
    assert start_failure_code(prefix + 'chdir to cwd ("/x") set in config.json failed: '
                              "no such file or directory: unknown") == 126


def test_derived_instance_id_is_a_valid_target():
    """A container without rune.instance gets an id with -instance- and no dots."""
    assert derived_instance_id("web", "my.web_1") == "web-instance-my-web_1"


def test_missing_engine_fails_when_required_and_skips_otherwise(tmp_path):
    """Without a reachable engine, Docker tests fail when CI requires them and skip otherwise."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
                     "from conftest import docker_engine  # noqa: F401\n\n"
                     "def test_probe(docker_engine):\n    assert docker_engine\n")
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(probe)]
    skipped = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=120,
                             env={**env, "RUNE_REQUIRE_DOCKER": "0"})
    assert skipped.returncode == 0 and b"no Docker Engine answers" in skipped.stdout
    failed = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=120,
                            env={**env, "RUNE_REQUIRE_DOCKER": "1"})
    assert failed.returncode == 1 and b"RUNE_REQUIRE_DOCKER=1" in failed.stdout


def _compose_command() -> list[str] | None:
    for argv in (["docker", "compose"], ["docker-compose"]):
        try:
            if subprocess.run([*argv, "version"], capture_output=True, timeout=30).returncode == 0:
                return argv
        except OSError:
            continue
    return None


def test_compose_file_is_valid():
    """docker-compose.yml parses, and wires NATS, the apiserver, the agent and a demo service."""
    compose = _compose_command()
    if compose is None:
        reason = "neither `docker compose` nor `docker-compose` is installed"
        if os.environ.get("RUNE_REQUIRE_DOCKER") == "1":
            pytest.fail(f"compose validation is required here: {reason}")
        pytest.skip(reason)
    result = subprocess.run([*compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
                            capture_output=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr.decode()
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) >= {"nats", "apiserver", "agent", "demo"}
    agent_mounts = str(services["agent"]["volumes"])
    assert "/var/run/docker.sock" in agent_mounts
    assert services["agent"]["pid"] == "host"
    assert services["demo"]["labels"] == {"rune.namespace": "default", "rune.service": "demo"}
    assert "ports" not in services["nats"]  # the broker is reachable only inside the stack


def test_exec_spec_passes_the_tty_size_at_create_from_api_1_42():
    """From API 1.42 the size rides on exec create; before, the spec has none (resize follows)."""
    from rune.agent.config import AgentConfig
    from rune.agent.runners.docker import DockerRunner
    from rune.agent.runners.engine_api import EngineAPI

    from rune.models import ExecOpen

    runner = DockerRunner(AgentConfig(agent_id="a1", docker={"enabled": True}), registry=None)
    runner.api = EngineAPI("unix:///nowhere.sock")
    request = ExecOpen(session_id="s", namespace="default", instance_id="x-instance-1",
                       argv=["sh", "-c", "stty size"], env={"A": "x=y"}, workdir="/tmp",
                       tty=True, width=101, height=33)
    for version, size in (("1.41", None), ("1.42", [33, 101]), ("1.45", [33, 101])):
        runner.api.version = version
        spec = runner._exec_spec(request)
        assert spec.get("ConsoleSize") == size
        assert spec["Cmd"] == ["sh", "-c", "stty size"] and spec["WorkingDir"] == "/tmp"
        assert "A=x=y" in spec["Env"] and "TERM=xterm-256color" in spec["Env"]
    assert "ConsoleSize" not in runner._exec_spec(request.model_copy(update={"tty": False}))


def test_runc_route_only_where_runc_and_its_state_are(tmp_path, monkeypatch):
    """No runc binary, no root dir, no state for the id, or an agent that does not adopt
    what runc leaves: the engine route instead."""
    import asyncio

    from rune.agent.runners.reaper import REAPER
    from rune.agent.runners.runc_exec import RuncExec

    async def check() -> None:
        monkeypatch.setattr("os.geteuid", lambda: 0)
        assert not RuncExec(str(tmp_path), binary="sh").start()  # not a subreaper
        REAPER.enable()
        try:
            assert not RuncExec(str(tmp_path), binary="no-such-runc-xyz").start()
            assert not RuncExec(str(tmp_path / "missing"), binary="sh").start()
            route = RuncExec(str(tmp_path), binary="sh")
            assert route.start()
        finally:
            REAPER.disable()
        try:
            (tmp_path / "abc123").mkdir()
            (tmp_path / "abc123" / "state.json").write_text("{}")
            (tmp_path / "state.json").write_text("{}")
            assert route.runs("abc123")
            assert not route.runs("def456")
            assert not route.runs("")  # the root's own file is no container's
            assert not route.runs("../" + tmp_path.name + "/abc123")
        finally:
            route.stop()
        assert not route.runs("abc123")

    asyncio.run(check())


def test_pid_files_tell_each_pid_as_it_is_renamed_into_place():
    """runc writes .N.pid, then renames it to N.pid: the future of N.pid gets the PID."""
    import asyncio

    from rune.agent.runners.reaper import REAPER
    from rune.agent.runners.runc_exec import PidFiles

    async def check() -> None:
        files = PidFiles()
        try:
            first, first_known = files.new()
            second, second_known = files.new()
            hidden = os.path.join(files.dir, "." + os.path.basename(second))
            with open(hidden, "w") as f:
                f.write("4242")
            os.rename(hidden, second)
            assert await asyncio.wait_for(second_known, 5) == 4242
            REAPER.release(4242)  # owned as a command runc would leave to the agent
            assert not first_known.done()
            files.forget(first)
            assert first_known.cancelled()
        finally:
            files.close()
        assert not os.path.exists(files.dir)

    asyncio.run(check())
