"""Instances declared with `user:` run as that user, and so does everything exec'd into them."""

from __future__ import annotations

import os
import pwd

import pytest
from conftest import Rune, start_stack

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture(scope="module")
def rune_as_nobody(tmp_path_factory):
    services = [{"name": "svc", "namespace": "default", "replicas": 1, "user": "nobody",
                 "command": ["sh", "-c", "id -u > started-as; exec sleep 2147483647"]}]
    stack = start_stack(tmp_path_factory.mktemp("user"), agents={"u1": services})
    yield Rune(stack)
    stack.stop()


def test_instance_and_exec_run_as_the_instance_user(rune_as_nobody):
    """The supervised process and an exec beside it both run as the declared user."""
    uid = str(pwd.getpwnam("nobody").pw_uid).encode()
    assert rune_as_nobody("exec", "svc", "cat", "started-as").stdout.strip() == uid
    assert rune_as_nobody("exec", "svc", "id", "-u").stdout.strip() == uid
    tty = rune_as_nobody("exec", "-t", "svc", "id", "-u")
    assert tty.stdout.strip() == uid
