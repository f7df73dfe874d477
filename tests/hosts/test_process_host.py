"""Process hosts: a node's cpu share (of ONE core) and memory limit are enforced by cgroups."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from testbed.net.network import EmulatedNetwork
from testbed.spec.topology import LinkSpec, NodeSpec, Topology

pytestmark = [pytest.mark.root, pytest.mark.slow]

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 3: pass\n"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_cpu_share_of_one_core_and_memory_limit():
    nodes = {"slow": NodeSpec("slow", "device", cpu=0.5, memory_mb=256), "fast": NodeSpec("fast", "edge")}
    topo = Topology("cpu", Path("cpu.yaml"), nodes, [LinkSpec("slow", "fast")])
    with EmulatedNetwork(topo, shaper="kernel") as net:
        host = net.mn.nameToNode["slow"]
        limit = [d for d in host.cgroups if "memory" in d.parts]
        assert int((limit[0] / "memory.limit_in_bytes").read_text()) == 256 * 1024 * 1024
        p = net.popen("slow", ["python3", "-c", BUSY])
        time.sleep(0.5)
        c0, t0 = cpu_seconds(p.pid), time.monotonic()
        time.sleep(2.0)
        share = (cpu_seconds(p.pid) - c0) / (time.monotonic() - t0)
        in_cgroup = Path(f"/proc/{p.pid}/cgroup").read_text()
        p.wait(timeout=10)
    assert f"cpu:/testbed/{net.run_id}/slow" in in_cgroup
    assert 0.40 <= share <= 0.55, share  # 0.5 of one core (quota 50 ms per 100 ms)
