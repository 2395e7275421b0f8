"""The bench: its quick mode runs end to end and reports sane figures; its parts, offline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import rows
from bench.context import BenchContext, Sizes
from bench.report import markdown
from bench.runner import SECTIONS, run_section
from bench.stats import percentile

ROOT = Path(__file__).resolve().parent.parent
QUICK = Sizes.quick()
RUNE_ROWS = ["setup.rune_cli", "setup.rune_api", "setup.nats", "stream.nontty.rune",
             "stream.nontty.local", "stream.tty.rune", "stream.tty.local"]
SSH_ROWS = ["setup.ssh", "stream.nontty.ssh", "stream.tty.ssh"]
DOCKER_ROWS = ["setup.docker", "stream.nontty.docker", "stream.tty.docker"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, timeout=240, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout.decode(), json.loads(out.read_text())


def _by_id(result: dict) -> dict[str, dict]:
    return {row["id"]: row for row in result["rows"]}


def _sane_ok(row: dict) -> None:
    assert row["status"] == "ok", row
    assert isinstance(row["value"], float) and math.isfinite(row["value"]) and row["value"] > 0
    if row["unit"] == "ms":
        assert row["n"] > 0 and 0 < row["min"] <= row["p50"] <= row["p99"] <= row["max"]


def test_quick_run_prints_table_and_writes_json_with_date_and_machine(quick_run):
    """One command prints a markdown table and writes JSON naming the date and machine."""
    stdout, result = quick_run
    assert "| section | measurement | p50 / value | p99 | n | vs rune |" in stdout
    assert result["quick"] is True and result["date"] and result["machine"]["cores"] >= 1
    assert result["duration_s"] > 0


def test_quick_run_rune_rows_and_floors_are_measured(quick_run):
    """Rune's own rows and the local floors always measure, with positive ordered figures."""
    found = _by_id(quick_run[1])
    for row_id in RUNE_ROWS:
        _sane_ok(found[row_id])
    assert found["setup.rune_cli"]["n"] == QUICK.cli_n
    assert found["setup.rune_api"]["n"] == QUICK.setup_n
    assert found["stream.tty.rune"]["bytes"] == QUICK.stream_bytes


def test_quick_run_baselines_measured_or_skipped_with_a_reason(quick_run):
    """ssh and docker exec rows measure (required in CI), else say why they were skipped."""
    found = _by_id(quick_run[1])
    for ids, required in ((SSH_ROWS, os.environ.get("RUNE_REQUIRE_SSHD") == "1"),
                          (DOCKER_ROWS, os.environ.get("RUNE_REQUIRE_DOCKER") == "1")):
        for row_id in ids:
            row = found[row_id]
            if required or row["status"] == "ok":
                _sane_ok(row)
                assert row["advantage"] > 0 and row["ref"].startswith(row_id.split(".")[0])
            else:
                assert row["status"] == "skipped" and row["reason"], row


def test_quick_run_holds_sessions_and_reports_memory_per_session(quick_run):
    """At each session count: RSS per session of apiserver and agent, and loaded latency."""
    found = _by_id(quick_run[1])
    for level in QUICK.sessions:
        for name in ("apiserver", "agent"):
            row = found[f"sessions.{level}.rss.{name}"]
            assert row["status"] == "ok" and row["unit"] == "KiB" and row["sessions"] == level
            assert math.isfinite(row["value"]) and row["rss_base_kib"] > 0
        _sane_ok(found[f"sessions.{level}.setup"])
        assert found[f"sessions.{level}.setup"]["ref"] == "sessions.0.setup"
    _sane_ok(found["sessions.0.setup"])


def test_quick_run_every_section_has_rows_and_none_failed(quick_run):
    """Every section appears; rows are measured, skipped or not landed, never errors."""
    result = quick_run[1]
    sections = {row["section"] for row in result["rows"]}
    assert sections == {title for _, title, _ in SECTIONS}
    assert not [row for row in result["rows"] if row["status"] == "error"]


def test_missing_section_module_yields_not_landed_rows(tmp_path):
    """A section whose module is absent gets its promised rows marked 'not landed'."""
    ctx = BenchContext(stack=None, workdir=tmp_path, quick=True, sizes=QUICK)
    got = run_section("no_such_section", "9. later", ["a", "b"], ctx)
    assert [(r["name"], r["status"]) for r in got] == [("a", "not landed"), ("b", "not landed")]


def test_ratio_says_how_many_times_rune_wins():
    """Advantage > 1 means rune is better: less time, or more MB/s."""
    rune_ms = rows.latency("r", "s", "rune", [0.010] * 3)
    ssh_ms = rows.latency("x", "s", "ssh", [0.030] * 3, ref="r")
    rune_mb = rows.throughput("rt", "s", "rune", 100_000_000, 2.0)
    pipe_mb = rows.throughput("p", "s", "pipe", 100_000_000, 0.5, ref="rt")
    table = [rune_ms, ssh_ms, rune_mb, pipe_mb]
    rows.attach_ratios(table)
    assert ssh_ms["advantage"] == pytest.approx(3.0)
    assert pipe_mb["advantage"] == pytest.approx(0.25)
    text = markdown(table, {"date": "d", "machine": {"cpu": "c", "cores": 2, "load_avg": [0.5]},
                            "quick": True,
                            "duration_s": 1.0})
    assert "rune 3.00× faster" in text and "rune 4.00× slower" in text


def test_percentile_is_nearest_rank():
    """p50 and p99 of 1..200 are the 100th and 198th values."""
    samples = [float(i) for i in range(200, 0, -1)]
    assert percentile(samples, 50) == 100.0 and percentile(samples, 99) == 198.0
