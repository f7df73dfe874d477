"""Role defaults and explicit limits (no root), and a CPU limit in force on both runtimes (root)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from testbed.hosts.limits import ROLE_DEFAULTS, Limits, resolve_limits
from testbed.spec.errors import SpecError
from testbed.spec.topology import NodeSpec


def test_role_defaults_apply_when_unset() -> None:
    assert resolve_limits(NodeSpec("p", "device")) == ROLE_DEFAULTS["device"]
    assert resolve_limits(NodeSpec("m", "edge")) == ROLE_DEFAULTS["edge"]
    assert resolve_limits(NodeSpec("c", "cloud")) == Limits(None, None)
    dev, edge = ROLE_DEFAULTS["device"], ROLE_DEFAULTS["edge"]
    assert dev.cpu < edge.cpu and dev.memory_mb < edge.memory_mb  # a device is the smaller one


def test_explicit_values_win_per_field() -> None:
    lim = resolve_limits(NodeSpec("p", "device", cpu=0.5))
    assert lim == Limits(cpu=0.5, memory_mb=ROLE_DEFAULTS["device"].memory_mb)
    lim = resolve_limits(NodeSpec("c", "cloud", memory_mb=512))
    assert lim == Limits(cpu=None, memory_mb=512)


def test_conversions() -> None:
    lim = Limits(cpu=0.5, memory_mb=256)
    assert lim.cfs_quota_us() == 50_000
    assert lim.nano_cpus() == 500_000_000
    assert lim.memory_bytes() == 256 * 1024 * 1024
    assert Limits().cfs_quota_us() == -1 and Limits().nano_cpus() is None


@pytest.mark.parametrize(("node", "field"), [
    (NodeSpec("p", "device", cpu=0), "nodes.p.cpu"),
    (NodeSpec("p", "device", cpu=-1.5), "nodes.p.cpu"),
    (NodeSpec("p", "edge", memory_mb=4), "nodes.p.memory_mb"),
])
def test_bad_limits_are_one_line_spec_errors(node: NodeSpec, field: str) -> None:
    with pytest.raises(SpecError) as e:
        resolve_limits(node, "topo.yaml")
    assert str(e.value).startswith(f"topo.yaml: {field}: ") and "\n" not in str(e.value)


def _docker_ok() -> bool:
    try:
        from testbed.hosts.docker_engine import engine

        engine()
        return True
    except Exception:
        return False


BUSY = "import time\nt = time.time()\nwhile time.time() - t < 3.0:\n    pass\n"


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.guest
@pytest.mark.parametrize("runtime", [
    "process", pytest.param("docker", marks=[pytest.mark.docker, pytest.mark.skipif(
        not _docker_ok(), reason="no Docker engine")]),
])
def test_half_cpu_busy_loop_gets_half_a_core(runtime: str, tmp_path: Path) -> None:
    """A busy loop on a 0.5-CPU device uses ~50% of a core (CFS quota), on either runtime."""
    from testbed.net.network import EmulatedNetwork
    from testbed.spec.topology import load_topology

    topo_file = tmp_path / "t.yaml"
    topo_file.write_text("name: lim\nnodes:\n  phone: {role: device, cpu: 0.5}\n  mec: {role: edge}\n"
                         "links:\n  - between: [phone, mec]\n")
    with EmulatedNetwork(load_topology(topo_file), shaper="kernel", runtime=runtime) as net:
        p = net.popen("phone", ["/usr/bin/python3", "-c", BUSY])
        t0 = time.monotonic()
        _pid, status, usage = os.wait4(p.pid, 0)
        wall = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
    share = (usage.ru_utime + usage.ru_stime) / wall
    print(f"{runtime}: busy loop got {share:.2f} of a core")
    assert p.returncode == 0
    # quota: at most half a core (small slack for the last period); contention can only lower it
    assert share <= 0.58, f"{runtime}: busy loop got {share:.2f} of a core with cpu: 0.5"
    load1 = os.getloadavg()[0]
    assert share >= 0.35 or load1 > 3, f"{runtime}: busy loop got only {share:.2f} of a core (load {load1})"
