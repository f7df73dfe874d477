"""`testbed up --no-cli` as a real subprocess: SIGTERM tears down cleanly; after SIGKILL,
`testbed clean` removes every leftover (processes, devices, cgroups, state file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.net.clean import leftovers
from tests.net import testbed_up

pytestmark = [pytest.mark.root, pytest.mark.slow]

TESTBED = [sys.executable, "-m", "testbed"]
TOPO = """
name: lifecycle
nodes:
  phone: {role: device, cpu: 0.5}
  dev2: {role: device}
  cell: {role: cell}
  mec: {role: edge}
links:
  - between: [phone, cell]
    up: {bw_mbit: 10}
    down: {bw_mbit: 20}
  - between: [dev2, cell]
  - between: [cell, mec]
    up: {bw_mbit: 50}
    down: {bw_mbit: 50}
"""


def start_up(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    topo = tmp_path / "lifecycle.yaml"
    topo.write_text(TOPO)
    return testbed_up.start_up(topo, "--shaper", "kernel")


def test_sigterm_tears_down(tmp_path: Path):
    p, run_id = start_up(tmp_path)
    during = leftovers(run_id)
    assert during["devices"] and during["processes"] and during["state"] and during["cgroups"]
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    assert leftovers(run_id) == {"devices": [], "processes": [], "cgroups": [], "state": []}


def test_sigkill_then_clean(tmp_path: Path):
    p, run_id = start_up(tmp_path)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    left = leftovers(run_id)
    assert left["devices"] and left["state"] and left["cgroups"]  # root-namespace things outlive a crash
    # --dead-only: other runs on this machine (owners alive) are left alone
    cmd = [*TESTBED, "clean", "--dead-only", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    removed = json.loads(out.stdout)
    assert run_id in removed["state_files"]
    assert set(left["processes"]) <= set(removed["processes"])
    assert leftovers(run_id) == {"devices": [], "processes": [], "cgroups": [], "state": []}


DRIVER = """
import sys, time
from pathlib import Path
from testbed.spec.topology import load_topology
from testbed.net.network import EmulatedNetwork
net = EmulatedNetwork(load_topology(sys.argv[1]), shaper="kernel")
net.start()
for node in ("phone", "mec"):
    # e.g. a shard server: keeps the namespace alive.  Wait until it runs inside the node (its
    # start goes through mnexec, which needs the node's shell, and the shell dies with us).
    p = net.popen(node, ["sh", "-c", "echo running; exec sleep 600"])
    assert p.stdout.readline().strip() == b"running"
print("ready run:", net.run_id, flush=True)
time.sleep(600)
"""


def test_crash_with_running_processes_then_clean(tmp_path: Path):
    topo = tmp_path / "lifecycle.yaml"
    topo.write_text(TOPO)
    p = subprocess.Popen([sys.executable, "-c", DRIVER, str(topo)], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("ready"), line
    run_id = line.split()[-1]
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    left = leftovers(run_id)
    assert len(left["processes"]) >= 2 and left["devices"] and left["state"]
    out = subprocess.run([*TESTBED, "clean", "--dead-only"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "removed" in out.stdout, out.stdout + out.stderr
    assert leftovers(run_id) == {"devices": [], "processes": [], "cgroups": [], "state": []}


def _live_run(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    topo = tmp_path / "lifecycle.yaml"
    topo.write_text(TOPO)
    p = subprocess.Popen([sys.executable, "-c", DRIVER, str(topo)], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line.startswith("ready"):
        p.kill()
        pytest.fail(f"driver did not start: {line!r}")
    return p, line.split()[-1]


def _clean(*flags: str) -> dict:
    out = subprocess.run([*TESTBED, "clean", "--json", *flags], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_clean_spares_a_live_run(tmp_path: Path):
    """``testbed clean`` touches only runs whose owner is dead: a live one stays intact."""
    p, run_id = _live_run(tmp_path)
    try:
        before = leftovers(run_id)
        assert before["devices"] and before["processes"] and before["state"]
        assert run_id not in _clean()["state_files"]
        assert leftovers(run_id) == before
        assert p.poll() is None
    finally:
        p.kill()  # the driver never tears down: its run is now a dead one
        p.wait(timeout=30)
    assert run_id in _clean()["state_files"]
    assert leftovers(run_id) == {"devices": [], "processes": [], "cgroups": [], "state": []}


@pytest.mark.skipif(os.environ.get("TESTBED_EXCLUSIVE") != "1",
                    reason="clean --all removes every run on the machine: set TESTBED_EXCLUSIVE=1 where "
                           "nothing else runs")
def test_clean_all_removes_a_live_run(tmp_path: Path):
    p, run_id = _live_run(tmp_path)
    try:
        assert leftovers(run_id)["state"]
        assert run_id in _clean("--all")["state_files"]
        assert leftovers(run_id) == {"devices": [], "processes": [], "cgroups": [], "state": []}
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
