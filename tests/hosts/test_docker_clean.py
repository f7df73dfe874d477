"""Leftover containers of a SIGKILLed run are removed by ``testbed clean`` (by label)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.hosts import docker_engine as de
from testbed.hosts.images import ensure_image

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from testbed.net.network import EmulatedNetwork
from testbed.spec.topology import load_topology
net = EmulatedNetwork(load_topology(sys.argv[1]), shaper="kernel", runtime="docker")
net.start()
p = net.popen("phone", ["sleep", "600"])   # a process attached to the container from outside
print(net.run_id, p.pid, flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a reaper."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_clean_removes_containers_of_a_killed_run(client, tmp_path: Path) -> None:
    topo = tmp_path / "t.yaml"
    topo.write_text("name: kill\nnodes:\n  phone: {role: device, cpu: 0.5}\n  mec: {role: edge}\n"
                    "links:\n  - between: [phone, mec]\n")
    owner = subprocess.Popen([sys.executable, "-c", HOLD, str(topo)], stdout=subprocess.PIPE, text=True,
                             cwd=REPO)
    run_id = None
    try:
        line = owner.stdout.readline().split()
        assert len(line) == 2, "the holder did not bring the network up"
        run_id, attached = line[0], int(line[1])
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        left = client.containers.list(filters={"label": f"{de.RUN_LABEL}={run_id}"})
        assert len(left) == 2  # a killed run leaves its containers running
        r = subprocess.run([sys.executable, "-m", "testbed", "clean"], capture_output=True, cwd=REPO,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"edgellm-{run_id}-phone" in r.stdout
        assert client.containers.list(all=True, filters={"label": f"{de.RUN_LABEL}={run_id}"}) == []
        deadline = time.monotonic() + 5
        while _running(attached) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(attached)  # the attached process died with its container
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if run_id:
            de.remove_labelled(client, run_id)


def test_remove_labelled_only_touches_its_run(client) -> None:
    """``remove_labelled(run_id=...)`` leaves other runs' containers alone."""
    tag = ensure_image(client=client).tag
    mine, other = f"t{os.getpid()}a", f"t{os.getpid()}b"
    made = [client.containers.run(tag, ["sleep", "60"], detach=True, network_mode="none",
                                  labels={de.LABEL: "1", de.RUN_LABEL: rid}) for rid in (mine, other)]
    try:
        removed = de.remove_labelled(client, mine)
        assert removed == [made[0].name]
        still = client.containers.list(filters={"label": f"{de.RUN_LABEL}={other}"})
        assert [c.id for c in still] == [made[1].id]
    finally:
        for c in made:
            de.remove_container(c)
