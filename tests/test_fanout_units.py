"""Fan-out pieces without a network: selection, flag parsing, output, summary, exit status."""

from __future__ import annotations

import io

import pytest
from rune.apiserver.fanout import select
from rune.cli.fanout_cmd import parse_instances, parse_selector
from rune.cli.fanout_output import (
    InstanceResult,
    JsonWriter,
    LineSplitter,
    LineWriter,
    Progress,
    overall_exit,
    render_bar,
    summary,
)

from rune.errors import InvalidArgument, NotFound, NotRunning
from rune.models import InstanceInfo
from rune.proto import exec_pb2 as pb


def _info(service: str, agent: str, index: int, state: str = "running",
          **labels: str) -> InstanceInfo:
    return InstanceInfo(namespace="default", service=service,
                        instance_id=f"{service}-instance-{agent}-{index}", state=state,
                        agent=agent, host=f"h-{agent}", runner="process", labels=labels)


FLEET = [_info("web", "a1", 0, zone="a"), _info("web", "a1", 1, zone="a"),
         _info("web", "a2", 0, zone="b"), _info("web", "a2", 1, state="exited", zone="b"),
         _info("db", "a1", 0, zone="a")]


def _ids(items: list[InstanceInfo]) -> list[str]:
    return [i.instance_id for i in items]


def test_select_all_takes_running_instances_of_the_service():
    """--all: every running instance of the service, none of another service."""
    got = select(FLEET, pb.FanoutRequest(target="web", all=True), "default")
    assert _ids(got) == ["web-instance-a1-0", "web-instance-a1-1", "web-instance-a2-0"]


def test_select_star_and_selector():
    """'*' spans services; the selector keeps instances whose labels all match."""
    request = pb.FanoutRequest(target="*", selector={"zone": "a"})
    assert _ids(select(FLEET, request, "default")) == [
        "db-instance-a1-0", "web-instance-a1-0", "web-instance-a1-1"]


def test_select_errors_say_what_is_wrong():
    """Unknown service, unknown or stopped listed id, empty match, instance id as target."""
    with pytest.raises(NotFound, match="service \"nope\""):
        select(FLEET, pb.FanoutRequest(target="nope", all=True), "default")
    with pytest.raises(NotFound, match="web-instance-zz-0"):
        select(FLEET, pb.FanoutRequest(target="web", instances=["web-instance-zz-0"]),
               "default")
    with pytest.raises(NotRunning, match="exited"):
        select(FLEET, pb.FanoutRequest(target="web", instances=["web-instance-a2-1"]),
               "default")
    with pytest.raises(NotRunning, match="matching zone=c"):
        select(FLEET, pb.FanoutRequest(target="web", selector={"zone": "c"}), "default")
    with pytest.raises(InvalidArgument):
        select(FLEET, pb.FanoutRequest(target="web-instance-a1-0", all=True), "default")


def test_parse_selector_and_instances():
    """k=v[,k=v] repeatable; ids comma-separated, deduplicated in order; bad input raises."""
    assert parse_selector(["a=1,b=2", "c=x=y"]) == {"a": "1", "b": "2", "c": "x=y"}
    with pytest.raises(ValueError):
        parse_selector(["novalue"])
    assert parse_instances(["x,y", "x", "z"]) == ["x", "y", "z"]
    with pytest.raises(ValueError):
        parse_instances([","])


def test_line_splitter_never_mixes_partial_lines():
    """Partial lines wait for their newline; an endless line is cut at the cap."""
    s = LineSplitter()
    assert s.feed(("a", "stdout"), b"hel") == []
    assert s.feed(("b", "stdout"), b"x\ny") == [b"x\n"]
    assert s.feed(("a", "stdout"), b"lo\nwor") == [b"hello\n"]
    assert s.rest(("a", "stdout")) == b"wor\n"
    assert s.rest(("a", "stdout")) == b""
    long = s.feed(("c", "stdout"), b"z" * (200 * 1024))
    assert all(len(line) <= 64 * 1024 + 1 for line in long) and len(long) == 3


def test_line_writer_aligns_and_colours():
    """Prefixes are padded to the longest id; colour only where asked."""
    out, err = io.BytesIO(), io.BytesIO()
    w = LineWriter(["a-1", "long-id-2"], out, err, colour_out=True)
    w.output("a-1", "stdout", b"x\npartial")
    w.output("long-id-2", "stderr", b"e\n")
    w.end("a-1")
    assert out.getvalue() == (b"\x1b[36ma-1       | \x1b[0mx\n"
                              b"\x1b[36ma-1       | \x1b[0mpartial\n")
    assert err.getvalue() == b"long-id-2 | e\n"
    plain = io.BytesIO()
    bare = LineWriter(["a-1"], plain, err, prefix=False)
    bare.output("a-1", "stdout", b"y\n")
    assert plain.getvalue() == b"y\n"


def test_json_writer_records():
    """Text chunks as `data`, binary ones as `data_base64`, and the final record."""
    out = io.BytesIO()
    w = JsonWriter(out, {"i": "h"})
    w.output("i", "stdout", b"ok\n")
    w.output("i", "stderr", b"\xff")
    w.result(InstanceResult("i", service="s", agent="a", host="h", status="exited", code=3,
                            duration=0.5))
    lines = out.getvalue().decode().splitlines()
    assert lines[0] == '{"type":"output","instance":"i","host":"h","stream":"stdout",' \
                       '"data":"ok\\n"}'
    assert '"data_base64":"/w=="' in lines[1]
    assert '"status":"exited","exit_code":3' in lines[2]


def test_overall_exit_follows_pdsh():
    """0 if all 0; the highest code; signals as 128+N; 255 if any unreachable."""
    ok = InstanceResult("a", status="exited")
    three = InstanceResult("b", status="exited", code=3)
    killed = InstanceResult("c", status="exited", code=0, signal=9)
    lost = InstanceResult("d", status="unreachable", code=255)
    cancelled = InstanceResult("e", status="cancelled")
    assert overall_exit([ok, cancelled]) == 0
    assert overall_exit([ok, three]) == 3
    assert overall_exit([three, killed]) == 137
    assert overall_exit([ok, lost, three]) == 255
    assert overall_exit([InstanceResult("f", status="failed", code=124)]) == 124


def test_summary_table():
    """Instance, host, exit, duration and status, then the rollout counts and a tally."""
    text = summary([InstanceResult("i-1", host="h1", status="exited", duration=1.234),
                    InstanceResult("i-22", host="h2", status="unreachable", code=255,
                                   error="agent a2 is not reachable")])
    assert text.splitlines() == [
        "INSTANCE  HOST  EXIT  DURATION  STATUS",
        "i-1       h1    0     1.23s     exited",
        "i-22      h2    255   0.00s     unreachable: agent a2 is not reachable",
        "targeted 2, ok 1, failed 0, timed out 0, unreachable 1, skipped 0",
        "2 instances: 1 exited 0, 1 unreachable",
    ]


def test_progress_bar_only_on_a_terminal_and_when_slow(monkeypatch):
    """Nothing when disabled or quick; a bar later; cleared before output."""
    assert render_bar(5, 10, 1, 2.0, width=10) == "[#####-----] 5/10 done, 1 failed 2.0s"
    stream = io.StringIO()
    off = Progress(stream, 10, enabled=False)
    off.refresh(force=True)
    assert stream.getvalue() == ""
    on = Progress(stream, 10, enabled=True)
    on.refresh(force=True)
    assert stream.getvalue() == ""  # not yet: the fan-out is still short
    monkeypatch.setattr(on, "_began", on._began - 1.0)
    on.done = 3
    on.refresh(force=True)
    assert "3/10 done" in stream.getvalue() and on.visible
    on.clear()
    assert stream.getvalue().endswith("\r\x1b[K") and not on.visible


def test_every_valued_exec_option_is_known_to_the_command_split():
    """The words after TARGET are the command from the first word that is not an option or
    an option's value: every exec option that takes a value must be listed for that."""
    import typer.main
    from rune.cli.exec_cmd import EXEC_VALUED_OPTIONS
    from rune.cli.main import build_app

    command = typer.main.get_command(build_app(full=False)).commands["exec"]
    valued = {name for p in command.params if not getattr(p, "is_flag", True)
              and p.param_type_name == "option" for name in p.opts}
    assert valued <= EXEC_VALUED_OPTIONS, valued - EXEC_VALUED_OPTIONS
