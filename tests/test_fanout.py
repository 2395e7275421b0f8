"""Fan-out end to end: the real CLI → apiserver → NATS → two agents × three instances."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from conftest import Rune, start_stack

SLEEPER = ["sleep", "2147483647"]


def _services(zone: str, batch: bool = False) -> list[dict]:
    services = [{"name": "web", "replicas": 3, "command": SLEEPER,
                 "labels": {"tier": "front", "zone": zone}}]
    if batch:
        services.append({"name": "batch", "replicas": 1, "command": SLEEPER,
                         "labels": {"tier": "back", "zone": zone}})
    return services


WEB = [f"web-instance-{a}-{i}" for a in ("a1", "a2") for i in range(3)]
WIDTH = max(len(i) for i in WEB)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("fanout"),
                        agents={"a1": _services("a", batch=True), "a2": _services("b")})
    yield Rune(stack)
    stack.stop()


def _summary(stderr: bytes) -> dict[str, list[str]]:
    """Summary rows by instance: [host, exit, duration, status...]."""
    rows = {}
    for line in stderr.decode().splitlines():
        words = line.split()
        if words and "-instance-" in words[0] and "|" not in words:
            rows[words[0]] = words[1:]
    return rows


def test_all_returns_each_output_once_prefixed(fleet):
    """--all: every instance's line exactly once, aligned prefix, summary, exit 0."""
    result = fleet("exec", "web", "--all", "sh", "-c", 'echo "out $RUNE_INSTANCE"')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert sorted(lines) == sorted(f"{i:<{WIDTH}} | out {i}" for i in WEB)
    rows = _summary(result.stderr)
    assert set(rows) == set(WEB)
    for instance, row in rows.items():
        host, code, duration, status = row[:4]
        assert host.endswith(instance.split("-")[2])  # host-<agent> from the dev stack
        assert (code, status) == ("0", "exited")
        assert re.fullmatch(r"\d+\.\d\ds", duration)
    assert result.stderr.decode().splitlines()[-1] == "6 instances: 6 exited 0"


def test_exit_status_is_the_highest_remote_code(fleet):
    """Mixed exit codes: the CLI exits with the highest; the summary shows each."""
    result = fleet("exec", "web", "--all", "sh", "-c", "exit ${RUNE_INSTANCE##*-}")
    assert result.returncode == 2
    rows = _summary(result.stderr)
    assert {i: rows[i][1] for i in WEB} == {i: i[-1] for i in WEB}


def test_signal_death_counts_as_128_plus_n(fleet):
    """An instance killed by a signal counts as 128+N in the aggregated status."""
    result = fleet("exec", "web", "--instances", "web-instance-a1-0", "sh", "-c", "kill -9 $$")
    assert result.returncode == 137


def test_stderr_lines_are_prefixed_on_stderr(fleet):
    """Remote stderr goes to local stderr, prefixed; stdout stays clean of it."""
    result = fleet("exec", "web", "--all", "sh", "-c", "echo oops >&2")
    assert result.stdout == b""
    err = result.stderr.decode().splitlines()
    assert sorted(line for line in err if "|" in line) == sorted(
        f"{i:<{WIDTH}} | oops" for i in WEB)


def test_selector_matches_labels(fleet):
    """--selector picks instances by label; '*' spans every service of the namespace."""
    result = fleet("exec", "web", "--selector", "zone=b", "sh", "-c", "echo $RUNE_INSTANCE")
    assert result.returncode == 0
    assert sorted(line.split(" | ")[1] for line in result.stdout.decode().splitlines()) == \
        [i for i in WEB if "-a2-" in i]
    result = fleet("exec", "*", "-l", "zone=a", "sh", "-c", "echo $RUNE_INSTANCE")
    got = sorted(line.split(" | ")[1] for line in result.stdout.decode().splitlines())
    assert got == ["batch-instance-a1-0", *[i for i in WEB if "-a1-" in i]]
    result = fleet("exec", "web", "--selector", "zone=nowhere", "true")
    assert result.returncode == 255
    assert "no running instance matching zone=nowhere" in result.stderr.decode()


def test_instances_list_and_unknown_id(fleet):
    """--instances a,b runs on exactly those; an unknown id fails before anything runs."""
    chosen = "web-instance-a1-2,web-instance-a2-0"
    result = fleet("exec", "web", "--instances", chosen, "--max-parallel", "1", "sh", "-c",
                   "echo $RUNE_INSTANCE")
    assert result.returncode == 0
    width = len("web-instance-a1-2")
    assert sorted(result.stdout.decode().splitlines()) == [
        f"{i:<{width}} | {i}" for i in chosen.split(",")]
    result = fleet("exec", "web", "--instances", "web-instance-a1-0,web-instance-zz-9", "true")
    assert result.returncode == 255
    assert result.stderr.decode().startswith("Error: failed to initialize exec session: "
                                             "instance not found")
    assert "web-instance-zz-9" in result.stderr.decode()


def test_tty_is_refused(fleet):
    """-t with fan-out is a usage error: exit 2, one clear line, no connection tried."""
    result = fleet.bare("exec", "--api-server", "127.0.0.1:1", "-t", "web", "--all", "sh")
    assert result.returncode == 2
    assert result.stderr.decode().startswith("Error: a TTY cannot be used with fan-out")


def test_json_records(fleet):
    """--json: one JSON record per chunk and one final record per instance, on stdout."""
    result = fleet("exec", "web", "--all", "--json", "sh", "-c",
                   'echo "a $RUNE_INSTANCE"; echo b >&2; exit 4')
    assert result.returncode == 4
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    outputs = [r for r in records if r["type"] == "output"]
    finals = [r for r in records if r["type"] == "result"]
    assert sorted(r["instance"] for r in finals) == sorted(WEB)
    for final in finals:
        assert final["status"] == "exited" and final["exit_code"] == 4
        assert final["host"] and final["agent"] in ("a1", "a2") and final["duration"] >= 0
        mine = [r for r in outputs if r["instance"] == final["instance"]]
        assert "".join(r["data"] for r in mine if r["stream"] == "stdout") == \
            f"a {final['instance']}\n"
        assert "".join(r["data"] for r in mine if r["stream"] == "stderr") == "b\n"
        assert records.index(final) > max(records.index(r) for r in mine)


def test_no_prefix(fleet):
    """--no-prefix writes the bare lines, still one whole line at a time."""
    result = fleet("exec", "web", "--all", "--no-prefix", "sh", "-c", "echo $RUNE_INSTANCE")
    assert sorted(result.stdout.decode().splitlines()) == sorted(WEB)


def test_large_output_per_instance_in_order(fleet):
    """600 KB per instance (beyond the fan-out window) arrives complete and in order."""
    result = fleet("exec", "web", "--all", "seq", "1", "100000", timeout=120)
    assert result.returncode == 0
    per: dict[str, list[str]] = {}
    for line in result.stdout.decode().splitlines():
        instance, _, value = line.partition(" | ")
        per.setdefault(instance.strip(), []).append(value)
    expected = [str(n) for n in range(1, 100001)]
    assert set(per) == set(WEB)
    for values in per.values():
        assert values == expected


def test_fail_fast_stops_the_rest(fleet):
    """--fail-fast: the first failure cancels the running and the unstarted sessions."""
    marker = f"rune-failfast-{os.getpid()}-{time.monotonic_ns()}"
    script = ("case $RUNE_INSTANCE in *a1-0) exit 3;; esac; "
              f"exec python3 -c 'import time; time.sleep(60)' {marker}")
    result = fleet("exec", "web", "--all", "--fail-fast", "--max-parallel", "4", "sh", "-c",
                   script, timeout=30)
    assert result.returncode == 3
    rows = _summary(result.stderr)
    assert rows["web-instance-a1-0"][1:4:2] == ["3", "exited"]
    statuses = {rows[i][3] for i in WEB if i != "web-instance-a1-0"}
    assert statuses == {"cancelled:"}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout == b"":
            break
        time.sleep(0.1)
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout == b"", \
        "a cancelled remote command survived"


def test_without_selection_fanout_flags_are_usage_errors(fleet):
    """--json/--fail-fast without --all/--instances/--selector exit 2."""
    result = fleet.bare("exec", "--api-server", "127.0.0.1:1", "--json", "web", "true")
    assert result.returncode == 2
    assert b"need --all, --instances or --selector" in result.stderr


def test_unreachable_agent_is_reported_without_hanging(tmp_path):
    """A frozen agent's instances are 'unreachable' (exit 255); the others complete."""
    stack = start_stack(tmp_path, agents={"a1": _services("a"), "a2": _services("b")},
                        api_extra={"open_timeout": 2.0})
    frozen = stack.procs["agent-a2"].pid
    try:
        os.kill(frozen, signal.SIGSTOP)
        result = Rune(stack)("exec", "web", "--all", "sh", "-c", "echo ok", timeout=60)
    finally:
        os.kill(frozen, signal.SIGCONT)
        stack.stop()
    assert result.returncode == 255
    assert sorted(result.stdout.decode().splitlines()) == sorted(
        f"{i:<{WIDTH}} | ok" for i in WEB if "-a1-" in i)
    rows = _summary(result.stderr)
    for instance in WEB:
        status = rows[instance][3]
        if "-a1-" in instance:
            assert (rows[instance][1], status) == ("0", "exited")
        else:
            assert (rows[instance][1], status) == ("255", "unreachable:")
            assert "agent a2 is not reachable" in " ".join(rows[instance])


def _disposition(ignored: bool):
    """The CLI started as a shell starts a foreground command, or a background job (SIGINT
    ignored), which is how CI runs the suite."""
    return (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else signal.SIG_DFL))


@pytest.mark.parametrize("signum, status, ignored", [
    (signal.SIGINT, 130, False), (signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)])
def test_interrupt_ends_every_remote_command(fleet, signum, status, ignored):
    """Ctrl-C (or SIGTERM) on the CLI ends the fan-out (exit 130 / 143) and every remote
    command with it, also when rune was started with SIGINT ignored."""
    marker = f"rune-fanout-int-{os.getpid()}-{time.monotonic_ns()}"
    proc = fleet.popen("exec", "web", "--all", "python3", "-c",
                       "import time; print('up', flush=True); time.sleep(60)", marker,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       stdin=subprocess.DEVNULL, preexec_fn=_disposition(ignored))
    try:
        ups = [proc.stdout.readline() for _ in WEB]
        assert all(line.endswith(b"| up\n") for line in ups)
        proc.send_signal(signum)
        assert proc.wait(timeout=20) == status
    finally:
        proc.kill()
        proc.wait()
    assert b"interrupted" in proc.stderr.read()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout == b"":
            break
        time.sleep(0.1)
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout == b"", \
        "a remote command survived the interrupt"
