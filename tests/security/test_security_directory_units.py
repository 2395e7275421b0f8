"""Credentials with no reach, as the apiserver's directory and the broker config see it."""

from __future__ import annotations

import pytest
from rune.apiserver.directory import InstanceDirectory
from rune.broker_config.generate import agent_permissions

from rune.errors import NotRunning
from rune.models import InstanceInfo
from rune.subjects import Subjects


def _info(agent: str, namespace: str, instance_id: str, service: str = "api") -> InstanceInfo:
    return InstanceInfo(namespace=namespace, service=service, instance_id=instance_id,
                        state="running", agent=agent, host=agent, runner="process")


def test_entries_outside_an_agents_namespaces_are_ignored_and_logged_once(caplog):
    """h1 is bound to default: its prod entry is ignored (once in the log), h2's stays."""
    directory = InstanceDirectory(None, None, agent_namespaces={"h1": ["default"]})
    with caplog.at_level("WARNING"):
        for _ in range(3):
            directory.accept(_info("h1", "prod", "db-instance-h2-0", "db"))
        directory.accept(_info("h2", "prod", "db-instance-h2-0", "db"))
    assert caplog.text.count("not bound to namespace prod") == 1
    assert directory.resolve("prod", "db").agent == "h2"
    assert directory.resolve("prod", "db-instance-h2-0").agent == "h2"


def test_an_instance_id_claimed_twice_is_a_conflict_until_one_goes():
    """Both claims show conflict and resolve for neither; the other wins once one goes."""
    directory = InstanceDirectory(None, None)
    real, forged = _info("h2", "default", "api-instance-h2-0"), \
        _info("h1", "default", "api-instance-h2-0")
    directory.accept(real)
    directory.accept(_info("h1", "default", "api-instance-h1-0"))
    directory.accept(forged)
    states = {i.key: i.state for i in directory.list("default")}
    assert states == {real.key: "conflict", forged.key: "conflict",
                      "h1.default.api-instance-h1-0": "running"}
    with pytest.raises(NotRunning, match=r"claimed by more than one agent \(h1, h2\)"):
        directory.resolve("default", "api-instance-h2-0")
    for _ in range(20):  # the service resolves only to the unclaimed instance
        assert directory.resolve("default", "api").instance_id == "api-instance-h1-0"
    directory.forget(forged.key)
    assert directory.resolve("default", "api-instance-h2-0").agent == "h2"


def test_agent_may_publish_audit_only_under_its_own_subject():
    """The generated broker permissions: no rune.audit.> for agents, only their own."""
    allowed = agent_permissions(Subjects("rune"), "h1")["publish"]["allow"]
    assert "rune.audit.>" not in allowed
    assert "rune.audit.*.agent.h1.>" in allowed
    assert Subjects("rune").agent_audit("prod", "h1", "session.failed") == \
        "rune.audit.prod.agent.h1.session.failed"
