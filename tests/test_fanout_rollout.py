"""Fan-out rollout controls end to end: batches, failure budget, canaries, job timeout."""

from __future__ import annotations

import json
import re
import time

import grpc
import pytest
from conftest import Rune, start_stack

from rune.proto import exec_pb2 as pb
from rune.proto import exec_pb2_grpc as pb_grpc

FLEET = 100
SLEEPER = ["sleep", "2147483647"]
# Instances -10 … -14 fail at once; every other member takes a moment to succeed.
FIVE_FAIL = ["sh", "-c", 'case "$RUNE_INSTANCE" in *-1[0-4]) exit 3;; esac; sleep 0.5']


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("rollout"), agents={
        "a1": [{"name": "fleet", "replicas": FLEET // 2, "command": SLEEPER}],
        "a2": [{"name": "fleet", "replicas": FLEET // 2, "command": SLEEPER}]})
    yield stack
    stack.stop()


def run(stack, **fields) -> tuple[list[pb.FanoutResponse], list[tuple[float, pb.FanoutResponse]]]:
    """The whole response stream of one fan-out, and each response's arrival time."""
    fields.setdefault("target", "fleet")
    fields.setdefault("all", True)
    with grpc.insecure_channel(stack.api_address) as channel:
        timed = [(time.monotonic(), r) for r in
                 pb_grpc.FanoutServiceStub(channel).StreamFanout(pb.FanoutRequest(**fields),
                                                                 timeout=120)]
    return [r for _, r in timed], timed


def results(responses: list[pb.FanoutResponse]) -> dict[str, pb.FanoutResult]:
    found = {r.instance_id: r.result for r in responses if r.WhichOneof("msg") == "result"}
    assert len([r for r in responses if r.WhichOneof("msg") == "result"]) == len(found)
    return found


def statuses(found: dict[str, pb.FanoutResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for result in found.values():
        key = f"{result.status}:{result.code}" if result.status == "exited" else result.status
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_batch_and_failure_budget_skip_the_rest(fleet):
    """--batch 10% --max-fail 2 over 100 where 5 fail: at most 2 + a batch of failures
    start, the rest are skipped, every member has exactly one result."""
    responses, _ = run(fleet, command=FIVE_FAIL, batch="10%", max_fail="2")
    found = results(responses)
    assert len(found) == FLEET
    counts = statuses(found)
    started = [r for r in responses if r.WhichOneof("msg") == "started"]
    assert counts.get("exited:3", 0) <= 2 + 10
    assert counts.get("skipped", 0) >= FLEET - 2 * 10
    assert len(started) == FLEET - counts["skipped"]
    skipped = next(r for r in found.values() if r.status == "skipped")
    assert "--max-fail 2" in skipped.error.message
    assert sum(counts.values()) == FLEET


def test_a_failed_canary_stops_the_run(fleet):
    """--canary 3 whose canaries include a failure: only the canaries start."""
    plan = run(fleet, command=["true"], batch="5")[0][0].plan
    order = [i.instance_id for i in plan.instances]
    failing = order[1]
    command = ["sh", "-c", f'test "$RUNE_INSTANCE" != {failing}']
    responses, _ = run(fleet, command=command, canary=3, batch="5")
    found = results(responses)
    counts = statuses(found)
    assert counts == {"exited:0": 2, "exited:1": 1, "skipped": FLEET - 3}
    assert "canaries did not succeed" in found[order[3]].error.message


def test_canaries_that_succeed_let_the_rest_run(fleet):
    """--canary 2 that succeed: every member runs."""
    found = results(run(fleet, command=["true"], canary=2, batch="20")[0])
    assert statuses(found) == {"exited:0": FLEET}


def test_job_timeout_stops_running_and_skips_the_rest(fleet):
    """--job-timeout ends the running members as timed out and skips the unstarted."""
    responses, _ = run(fleet, command=["sleep", "30"], batch="4", job_timeout_seconds=1.0,
                       timeout_seconds=60)
    found = results(responses)
    counts = statuses(found)
    assert counts == {"timed_out": 4, "skipped": FLEET - 4}
    timed_out = next(r for r in found.values() if r.status == "timed_out")
    assert timed_out.code == 124 and "job timed out" in timed_out.error.message


def test_member_timeout_is_its_own(fleet):
    """A member's --timeout is distinct from the job's: it ends as timed_out, 124."""
    found = results(run(fleet, command=["sleep", "30"], instances=["fleet-instance-a1-0"],
                        timeout_seconds=0.5)[0])
    assert [(r.status, r.code) for r in found.values()] == [("timed_out", 124)]


def test_batch_wait_paces_the_members(fleet):
    """--batch 1 --batch-wait 0.3: each member starts at least 0.3 s after the previous
    one ended."""
    wanted = ["fleet-instance-a1-0", "fleet-instance-a1-1", "fleet-instance-a1-2"]
    _, timed = run(fleet, command=["true"], instances=wanted, batch="1",
                   batch_wait_seconds=0.3)
    events = [(t, r.WhichOneof("msg")) for t, r in timed if r.WhichOneof("msg")
              in ("started", "result")]
    kinds = [k for _, k in events]
    assert kinds == ["started", "result"] * 3
    for (ended, _), (began, _) in zip(events[1::2], events[2::2], strict=False):
        assert began - ended >= 0.3


@pytest.mark.parametrize("fields, message", [
    ({"batch": "0"}, "--batch"), ({"batch": "150%"}, "--batch"), ({"batch": "ten"}, "--batch"),
    ({"max_fail": "-1"}, "--max-fail"), ({"batch_wait_seconds": float("nan")}, "--batch-wait"),
    ({"job_timeout_seconds": -1.0}, "--job-timeout"),
])
def test_bad_rollout_terms_are_invalid_arguments(fleet, fields, message):
    """Out-of-range rollout terms are refused before any member starts."""
    with pytest.raises(grpc.RpcError) as info:
        run(fleet, command=["true"], **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert statuses(results(run(fleet, command=["true"], batch="50")[0])) == {"exited:0": FLEET}


# --- the same through the real CLI -------------------------------------------------------

def test_cli_failure_budget_summary_and_exit(fleet):
    """`rune exec --batch 10% --max-fail 2`: the summary counts every kind, exit non-zero."""
    result = Rune(fleet)("exec", "fleet", "--all", "--batch", "10%", "--max-fail", "2",
                         *FIVE_FAIL)
    assert result.returncode == 3, result.stderr
    counts = result.stderr.decode().splitlines()[-2]
    numbers = dict(re.findall(r"(targeted|ok|failed|timed out|unreachable|skipped) (\d+)",
                              counts))
    assert numbers["targeted"] == "100" and numbers["timed out"] == "0"
    assert 3 <= int(numbers["failed"]) <= 5 and int(numbers["skipped"]) >= 80
    assert sum(int(numbers[k]) for k in ("ok", "failed", "skipped")) == 100


def test_cli_group_prints_each_distinct_output_once(fleet):
    """--group over 20 instances with two distinct outputs prints two groups."""
    chosen = [f"fleet-instance-a1-{i}" for i in range(10)] + \
             [f"fleet-instance-a2-{i}" for i in range(10)]
    result = Rune(fleet)("exec", "fleet", "--instances", ",".join(chosen), "--group", "sh",
                         "-c", 'case "$RUNE_INSTANCE" in *a1-*) echo one;; *) echo two;; esac')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    heads = [line for line in lines if "(10)" in line]
    assert len(heads) == 2
    assert lines.count("one") == 1 and lines.count("two") == 1
    assert heads[0].split(" ")[0].split(",") == sorted(chosen[:10]) or \
        heads[1].split(" ")[0].split(",") == sorted(chosen[:10])


def test_cli_json_names_the_target_set_first(fleet):
    """--json: the first record is the resolved target set, then one result per member."""
    result = Rune(fleet)("exec", "fleet", "--instances", "fleet-instance-a1-0,"
                         "fleet-instance-a2-0", "--json", "true")
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert records[0]["type"] == "targets"
    assert [i["instance"] for i in records[0]["instances"]] == ["fleet-instance-a1-0",
                                                                 "fleet-instance-a2-0"]
    assert [r["status"] for r in records if r["type"] == "result"] == ["exited", "exited"]


@pytest.mark.parametrize("flags", [["--batch", "0"], ["--batch", "x%"], ["--max-fail", "-2"],
                                   ["--job-timeout", "soon"], ["--group", "--json"]])
def test_cli_bad_rollout_flags_exit_2(fleet, flags):
    """Bad rollout flags are usage errors: exit 2, `Error: …`, nothing runs."""
    result = Rune(fleet)("exec", "fleet", "--all", *flags, "true")
    assert result.returncode == 2
    assert result.stderr.decode().startswith("Error: ")
