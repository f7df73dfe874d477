"""Finding the cgroup layout (v1 or v2) from the mount table, and the v1 -> v2 weight scale."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.hosts import cgroups

pytestmark = pytest.mark.guest  # v1 here, v2 in the test guest

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 31 0:32 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def unified(root: Path) -> str:
    return f"29 23 0:26 / {root} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_hybrid_machine_uses_v1_where_the_controllers_are() -> None:
    lay = cgroups.layout(HYBRID)
    assert lay.version == 1
    assert lay.roots == {"cpu": Path("/sys/fs/cgroup/cpu,cpuacct"), "memory": Path("/sys/fs/cgroup/memory")}
    v1, v2 = cgroups.mounts(HYBRID)
    assert v2 == Path("/sys/fs/cgroup/unified") and any("pids" in opts for opts in v1)


def test_unified_machine_uses_v2(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    lay = cgroups.layout(unified(tmp_path))
    assert lay.version == 2 and lay.roots == {"cpu": tmp_path, "memory": tmp_path}


def test_v2_without_the_controllers_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("pids\n")
    with pytest.raises(cgroups.CgroupUnavailable, match="cpu and memory"):
        cgroups.layout(unified(tmp_path))


def test_bind_mounted_sub_group_is_not_a_hierarchy() -> None:
    inside = "50 40 0:29 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    assert cgroups.mounts(inside) == ({}, None)


def test_shares_to_weight_keeps_the_kernel_scale() -> None:
    assert cgroups.shares_to_weight(1024) == 100  # one nice-0 task
    assert cgroups.shares_to_weight(8 * 1024) == 800
    assert cgroups.shares_to_weight(2) == 1 and cgroups.shares_to_weight(10**7) == 10000


def test_this_machine_has_a_layout() -> None:
    lay = cgroups.layout()
    assert lay.version in (1, 2)
    for root in lay.roots.values():
        assert root.is_dir()
