"""Process hosts: a node's cpu share (of ONE core) and memory limit are enforced by cgroups,
v1 or v2, whichever this machine's controllers use (v1 on the development hosts, v2 in the guest)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from testbed.hosts import cgroups
from testbed.hosts.process_host import SHARES_WEIGHT, run_cgroup_dirs
from testbed.net.network import EmulatedNetwork
from testbed.spec.topology import LinkSpec, NodeSpec, Topology

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.guest]

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 3: pass\n"
# Touch 200 MiB page by page: more than a 128 MiB node may hold.
HOG = "b = bytearray(200 * 1024 * 1024)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')\n"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_groups(pid: int) -> list[str]:
    """The cgroup paths of ``pid``, one per hierarchy (v2: a single ``0::/...`` line)."""
    return [line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]


def topo(**slow) -> Topology:
    nodes = {"slow": NodeSpec("slow", "device", **slow), "fast": NodeSpec("fast", "cloud")}
    return Topology("cpu", Path("cpu.yaml"), nodes, [LinkSpec("slow", "fast")])


def test_cpu_share_of_one_core_and_memory_limit():
    lay = cgroups.layout()
    with EmulatedNetwork(topo(cpu=0.5, memory_mb=256), shaper="kernel") as net:
        host = net.mn.nameToNode["slow"]
        group = f"/testbed/{net.run_id}/slow"
        if lay.version == 1:
            mem = lay.roots["memory"] / group.lstrip("/")
            cpu = lay.roots["cpu"] / group.lstrip("/")
            assert int((mem / "memory.limit_in_bytes").read_text()) == 256 * 1024 * 1024
            assert (cpu / "cpu.cfs_quota_us").read_text().split() == ["50000"]
            assert (cpu / "cpu.shares").read_text().split() == [str(SHARES_WEIGHT)]
        else:
            d = lay.roots["cpu"] / group.lstrip("/")
            assert host.cgroups == [d]
            assert (d / "memory.max").read_text().split() == [str(256 * 1024 * 1024)]
            assert (d / "cpu.max").read_text().split() == ["50000", "100000"]
            assert (d / "cpu.weight").read_text().split() == [str(cgroups.shares_to_weight(SHARES_WEIGHT))]
            if (d / "memory.swap.max").exists():
                assert (d / "memory.swap.max").read_text().split() == ["0"]
        p = net.popen("slow", ["python3", "-c", BUSY])
        time.sleep(0.5)
        c0, t0 = cpu_seconds(p.pid), time.monotonic()
        time.sleep(2.0)
        share = (cpu_seconds(p.pid) - c0) / (time.monotonic() - t0)
        groups = own_groups(p.pid)
        p.wait(timeout=30)
        assert run_cgroup_dirs(net.run_id)
    assert groups.count(group) == (2 if lay.version == 1 else 1), groups  # cpu + memory, or the one v2 group
    load1 = os.getloadavg()[0]
    # 0.5 of one core (quota 50 ms per 100 ms); contention on a loaded machine can only lower it
    assert share <= 0.58, share
    assert share >= 0.40 or load1 > 3, (share, load1)
    assert run_cgroup_dirs(net.run_id) == []  # torn down with the network


def test_memory_limit_kills_a_process_that_exceeds_it():
    with EmulatedNetwork(topo(memory_mb=128), shaper="kernel") as net:
        hog = net.popen("slow", ["python3", "-c", HOG])
        out, _ = hog.communicate(timeout=120)
        free = net.popen("fast", ["python3", "-c", HOG])  # the cloud node has no limit
        free_out, _ = free.communicate(timeout=120)
    assert hog.returncode != 0 and b"survived" not in out, (hog.returncode, out)
    assert free.returncode == 0 and b"survived" in free_out
