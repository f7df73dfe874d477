"""Where a run's containers go in the cgroup tree: what docker's cgroup driver accepts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from testbed.hosts.docker_host import cgroup_parent

pytestmark = [pytest.mark.docker]


def test_the_parent_follows_the_engine_cgroup_driver(client) -> None:
    """The engine here (cgroupfs) takes a path; a systemd-driven engine (the VM's) takes only a slice."""
    got = cgroup_parent(client, "r1")
    driver = client.info().get("CgroupDriver")
    assert got == ("testbed-r1.slice" if driver == "systemd" else "/testbed/r1")
    systemd = SimpleNamespace(info=lambda: {"CgroupDriver": "systemd"})  # what dockerd on systemd reports
    assert cgroup_parent(systemd, "r1") == "testbed-r1.slice"
