"""`testbed probe` end to end on the userspace backend: configured vs measured figures, and a
real Mahimahi trace replayed by the link process seen through `--timeline`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testbed.spec.traces import load_trace

REPO = Path(__file__).resolve().parents[2]
MAHIMAHI = Path(__file__).resolve().parents[3] / "shared/traces/mahimahi"

pytestmark = [pytest.mark.root, pytest.mark.slow]

# TCP goodput of a rate-limited link: 1448 payload bytes per 1500-byte IP packet (rates count IP bytes)
GOODPUT = 1448 / 1500


def near_rate(measured: float, configured: float, tol: float = 0.05) -> bool:
    return abs(measured - configured * GOODPUT) <= tol * configured * GOODPUT


def probe_json(topo: Path, *extra: str) -> dict:
    argv = [sys.executable, "-m", "testbed", "probe", str(topo), "--src", "phone", "--dst", "mec",
            "--json", "--shaper", "userspace", *extra]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_probe_default_topology():
    res = probe_json(REPO / "topologies/device-edge-cloud.yaml", "--seconds", "4")
    assert res["shaper"] == "userspace"
    # phone -> mec: 10 Mbit/s with 0.5 % loss (TCP goodput is loss-limited below the rate);
    # mec -> phone: 50 Mbit/s loss-free; 15 + 15 ms one-way delays
    assert near_rate(res["down_mbit"], 50), res
    assert 0 < res["up_mbit"] <= 10 * 1.05, res
    assert abs(res["rtt_ms"] - 30) <= 2, res
    assert abs(res["loss_up_pct"] - 0.5) <= 1 and res["loss_down_pct"] <= 1, res


def test_probe_rate_rtt_loss_tolerances(tmp_path: Path):
    topo = tmp_path / "lossy.yaml"
    topo.write_text("""
name: lossy
nodes: {phone: {role: device}, mec: {role: edge}}
links:
  - between: [phone, mec]
    up:   {bw_mbit: 20, delay_ms: 10, loss_pct: 5}
    down: {bw_mbit: 30, delay_ms: 12}
""")
    res = probe_json(topo, "--seconds", "4")
    assert near_rate(res["down_mbit"], 30), res
    assert abs(res["rtt_ms"] - 22) <= 2, res
    assert abs(res["loss_up_pct"] - 5) <= 1 and res["loss_down_pct"] <= 1, res


def best_alignment(timeline: list[float], trace, search_s: float = 90.0) -> tuple[float, np.ndarray]:
    """Per-second relative errors at the trace offset (0.1 s steps) that fits the timeline best."""
    got = np.array(timeline)
    best = None
    for start in np.arange(0.0, search_s, 0.1):
        want = np.array(trace.capacity_mbit_per_s(len(got), start_s=float(start)))
        err = np.abs(got - want) / np.maximum(want, 0.5)
        if best is None or err.mean() < best[1].mean():
            best = (float(start), err)
    return best


@pytest.mark.skipif(not MAHIMAHI.is_dir(), reason="shared Mahimahi traces not present")
def test_probe_timeline_follows_real_trace(tmp_path: Path):
    trace_file = MAHIMAHI / "Verizon-LTE-short.up"
    topo = tmp_path / "lte.yaml"
    topo.write_text(f"""
name: lte
nodes: {{phone: {{role: device}}, mec: {{role: edge}}}}
links:
  - between: [phone, mec]
    up:   {{trace: {trace_file}, format: mahimahi, queue_pkts: 100}}
    down: {{bw_mbit: 20}}
""")
    res = probe_json(topo, "--seconds", "6", "--timeline")
    up = res["up_timeline"]
    assert len(up) >= 5 and all(abs(x - 20) <= 2 for x in res["down_timeline"]), res
    start, err = best_alignment(up, load_trace(trace_file, "mahimahi"))
    assert err.mean() <= 0.10 and err.max() <= 0.25, (start, up, err)
