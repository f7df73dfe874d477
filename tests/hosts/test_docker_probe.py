"""`testbed probe --runtime docker`: shaped rate, delay and loss measured between two containers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.hosts import docker_engine as de
from tests.measured import MEASURED

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

GOODPUT = 1448 / 1500  # TCP payload per IP packet on a rate-limited link (rates count IP bytes)


@MEASURED
def test_probe_between_containers_within_tolerance(client, tmp_path: Path) -> None:
    topo = tmp_path / "lossy.yaml"
    topo.write_text("""
name: dockprobe
nodes: {phone: {role: device, cpu: 1.0}, mec: {role: edge}}
links:
  - between: [phone, mec]
    up:   {bw_mbit: 20, delay_ms: 10, loss_pct: 5}
    down: {bw_mbit: 30, delay_ms: 12}
""")
    before = {c.id for c in client.containers.list(all=True, filters={"label": de.LABEL})}
    argv = [sys.executable, "-m", "testbed", "probe", str(topo), "--src", "phone", "--dst", "mec",
            "--json", "--shaper", "userspace", "--runtime", "docker", "--seconds", "4"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    print("docker probe:", res)
    assert abs(res["down_mbit"] - 30 * GOODPUT) <= 0.05 * 30 * GOODPUT, res
    assert abs(res["rtt_ms"] - 22) <= 2, res
    assert abs(res["loss_up_pct"] - 5) <= 1 and res["loss_down_pct"] <= 1, res
    assert {c.id for c in client.containers.list(all=True, filters={"label": de.LABEL})} <= before
