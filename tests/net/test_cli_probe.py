"""`testbed probe` end to end on the userspace backend: configured vs measured figures, a real
Mahimahi trace replayed by the link process seen through `--timeline` (laid over the trace at the
reported trace time), figures and notes over an outage, and the routed path the rate hints
come from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testbed.net.addressing import path_links, plan
from testbed.net.commands import capacity_timeline, path_rate_mbit
from testbed.spec.topology import load_topology
from testbed.spec.traces import load_trace
from tests.measured import MEASURED

REPO = Path(__file__).resolve().parents[2]
MAHIMAHI = Path(__file__).resolve().parents[3] / "shared/traces/mahimahi"

pytestmark = [pytest.mark.root, pytest.mark.slow]

# TCP goodput of a rate-limited link: 1448 payload bytes per 1500-byte IP packet (rates count IP bytes)
GOODPUT = 1448 / 1500
# UDP payload per 1500-byte IP packet (iperf3 datagrams of 1448 bytes + 28 bytes of headers)
UDP_SHARE = 1448 / 1476


def near_rate(measured: float, configured: float, tol: float = 0.05) -> bool:
    return abs(measured - configured * GOODPUT) <= tol * configured * GOODPUT


def run_probe(topo: Path, *extra: str, shaper: str = "userspace") -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "testbed", "probe", str(topo), "--src", "phone", "--dst", "mec",
            "--json", "--shaper", shaper, *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)


def probe_json(topo: Path, *extra: str, shaper: str = "userspace") -> dict:
    out = run_probe(topo, *extra, shaper=shaper)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "warning" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    return json.loads(out.stdout)


@MEASURED
def test_probe_default_topology():
    res = probe_json(REPO / "topologies/device-edge-cloud.yaml", "--seconds", "4")
    assert res["shaper"] == "userspace"
    # phone -> mec: 10 Mbit/s with 0.5 % loss (TCP goodput is loss-limited below the rate);
    # mec -> phone: 50 Mbit/s loss-free; 15 + 15 ms one-way delays
    assert near_rate(res["down_mbit"], 50), res
    assert 0 < res["up_mbit"] <= 10 * 1.05, res
    assert abs(res["rtt_ms"] - 30) <= 2, res
    assert abs(res["loss_up_pct"] - 0.5) <= 1 and res["loss_down_pct"] <= 1, res
    m = res["machine_load"]
    assert 0 <= m["steal_pct"] <= m["busy_pct"] <= 100 and m["timer_late_us"] > 0, m


@MEASURED
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


@MEASURED
@pytest.mark.skipif(not MAHIMAHI.is_dir(), reason="shared Mahimahi traces not present")
@pytest.mark.parametrize("shaper", ["userspace", "kernel"])
def test_probe_timeline_follows_real_trace(tmp_path: Path, shaper: str):
    """The link process's replay (userspace) and the replay thread's HTB steps (kernel; HTB only)."""
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
    res = probe_json(topo, "--seconds", "6", "--timeline", shaper=shaper)
    assert res["shaper"] == shaper
    up, t0 = res["up_timeline"], res["up_timeline_trace_t0_s"]
    down = np.array(res["down_timeline"]) / (20 * UDP_SHARE)  # a fixed 20 Mbit/s, saturated
    # the median second: a second in which this machine's load stalls the UDP sender says nothing of
    # the shaping (here the mean of the six came out 6 % and 11 % low in 2 of 9 runs of a quiet machine)
    assert len(up) == 6 and abs(np.median(down) - 1) <= 0.05 and (np.abs(down - 1) > 0.2).sum() <= 1, res
    assert res["down_capacity_timeline"] == [20.0] * 6
    # the timelines come after four 6 s tests: well into the trace, the down one after the up one
    assert 24 <= t0 < res["down_timeline_trace_t0_s"] - 6, res
    # the configured capacity of those very seconds, as the trace file gives it
    want = load_trace(trace_file, "mahimahi").capacity_mbit_per_s(6, start_s=t0)
    assert res["up_capacity_timeline"] == pytest.approx(want, rel=1e-9), res
    # ... and the measurement lies over it: the UDP payload of what the trace let through
    err = np.abs(np.array(up) - np.array(want) * UDP_SHARE) / np.maximum(np.array(want), 0.5)
    assert err.mean() <= 0.10 and err.max() <= 0.30, (t0, up, want, err)


@pytest.mark.skipif(not MAHIMAHI.is_dir(), reason="shared Mahimahi traces not present")
def test_probe_over_an_outage_reports_figures_and_notes(tmp_path: Path):
    """A real trace with a 100 s outage cut into it: the up tests stop at their deadline and the
    probe still ends with figures (what was delivered) and a note per direction that stalled."""
    stamps = [int(x) for x in (MAHIMAHI / "Verizon-LTE-short.up").read_text().split()]
    outage = tmp_path / "outage.up"
    outage.write_text("\n".join(str(t) for t in stamps if t < 1000 or t >= 101_000) + "\n")
    topo = tmp_path / "outage.yaml"
    topo.write_text(f"""
name: outage
nodes: {{phone: {{role: device}}, mec: {{role: edge}}}}
links:
  - between: [phone, mec]
    up:   {{trace: {outage}, format: mahimahi}}
    down: {{bw_mbit: 20}}
""")
    out = run_probe(topo, "--seconds", "1")
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    res = json.loads(out.stdout)
    assert res["up_mbit"] < 1.0 and res["loss_up_pct"] > 50, res
    assert any(n.startswith("TCP test ") for n in res["notes"]["up"]), res["notes"]
    assert any(n.startswith("UDP test ") for n in res["notes"]["up"]), res["notes"]


CHAIN = """
name: chain
nodes: {phone: {role: device}, cellA: {role: cell}, dev2: {role: device}, mec: {role: edge},
        cloud: {role: cloud}}
links:
  - between: [phone, cellA]
    up: {bw_mbit: 8}
    down: {bw_mbit: 30}
  - between: [dev2, cellA]
    up: {bw_mbit: 1}
  - between: [cellA, mec]
    up: {bw_mbit: 40}
    down: {bw_mbit: 6}
  - between: [cloud, mec]
    up: {bw_mbit: 100}
    down: {trace: TRACE}
"""


def test_path_through_a_cell_and_both_directions_of_links(tmp_path: Path):
    trace = tmp_path / "steps.csv"
    trace.write_text("time_s,bw_mbit\n0,50\n2,3\n")  # period 4 s: 50 for 2 s, 3 for 2 s
    topo_file = tmp_path / "chain.yaml"
    topo_file.write_text(CHAIN.replace("TRACE", str(trace)))
    topo = load_topology(topo_file)
    p = plan(topo)
    # phone -> cloud: phone->cell (up), cell->mec (up), mec->cloud (the b->a end of [cloud, mec])
    assert path_links(topo, p, "phone", "cloud") == [(0, "up"), (2, "up"), (3, "down")]
    assert path_links(topo, p, "cloud", "phone") == [(3, "up"), (2, "down"), (0, "down")]
    assert path_links(topo, p, "dev2", "phone") == [(1, "up"), (0, "down")]  # bridged, no host between
    assert path_links(topo, p, "mec", "mec") == []
    assert path_rate_mbit(topo, p, "phone", "cloud") == 8  # the trace peaks at 50
    assert path_rate_mbit(topo, p, "cloud", "phone") == 6
    assert path_rate_mbit(topo, p, "mec", "cloud") == 50  # a trace counts with its peak
    assert path_rate_mbit(topo, p, "phone", "dev2") == 8  # cell -> dev2 is unlimited
    assert path_rate_mbit(topo, p, "dev2", "phone") == 1
    assert capacity_timeline(topo, p, "mec", "cloud", 1.5, 4) == pytest.approx([26.5, 3.0, 26.5, 50.0])
    assert capacity_timeline(topo, p, "phone", "cloud", 1.5, 4) == pytest.approx([8.0, 3.0, 8.0, 8.0])
    assert capacity_timeline(topo, p, "phone", "cloud", None, 3) is None


def demo_table(topo_file: Path, seconds: float) -> str:
    """The demo's configured-vs-measured table of a topology, as text."""
    from rich.console import Console

    from testbed.demo import probe_links, render
    from testbed.net.network import EmulatedNetwork

    topo = load_topology(topo_file)
    with EmulatedNetwork(topo, shaper="userspace") as net:
        rows = probe_links(net, topo, seconds)
    console = Console(record=True, width=200)
    console.print(render(rows, "userspace", topo.tcp_cc))
    return console.export_text()


@MEASURED
def test_demo_topology_is_emulated_faithfully():
    """Every figure of the access link within its tolerance; of the 200 Mbit/s backhaul, delay and
    loss, and rates never above what the rate allows (reaching 200 Mbit/s through the link process
    is the machine's capacity: see ``test_linkproc.test_rate_within_5pct``)."""
    text = demo_table(REPO / "topologies/device-edge-cloud.yaml", 3)
    assert "mec <-> cloud" in text and "200 / 193.1 / " in text and "timers ran up to" in text, text
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in text.splitlines() if "<->" in line}
    assert set(rows) == {"phone <-> mec", "mec <-> cloud"}, text
    assert not [c for c in rows["phone <-> mec"] if c.startswith("!")], text
    up, down, *rest = rows["mec <-> cloud"]
    assert not [c for c in rest if c.startswith("!")], text
    for cell in (up, down):
        assert float(cell.split("/")[-1]) <= 193.1 * 1.05, text


def test_demo_table_marks_a_link_beyond_the_ceiling(tmp_path: Path):
    fast = tmp_path / "fast.yaml"
    fast.write_text("""
name: fast
nodes: {a: {role: cloud}, b: {role: cloud}}
links:
  - between: [a, b]
    up:   {bw_mbit: 50000, delay_ms: 25}
    down: {bw_mbit: 50000, delay_ms: 25}
""")
    text = demo_table(fast, 2)
    row = next(line for line in text.splitlines() if "a <-> b" in line)
    assert row.count("! 50000 / ") == 2, text  # up and down: far below what the rate allows
