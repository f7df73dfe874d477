"""The userspace link process: shaping math on its own, then real namespaces and real traffic."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.net import probe
from testbed.net.shaping.linkproc import ETH_HLEN, Direction
from testbed.net.shaping.userspace import netns_link, start_link_process
from testbed.spec.topology import Shaping
from testbed.spec.traces import load_trace
from tests.measured import MEASURED

TRACES = Path(__file__).resolve().parents[3] / "shared/traces/mahimahi"
UDP_IP_BYTES = probe.UDP_PAYLOAD + 28  # payload + UDP + IPv4 headers
TCP_SHARE = 1448 / 1500  # TCP goodput per IP byte (MSS 1448 with timestamps)


def frame(ip_bytes: int) -> bytes:
    return bytes(ip_bytes + ETH_HLEN)


# --- shaping math, no network ------------------------------------------------------------


def test_rate_serializes_back_to_back() -> None:
    d = Direction("up", Shaping(bw_mbit=12.0), t0=0.0)  # 1500 B = 1 ms
    for _ in range(3):
        d.admit(frame(1500), now=10.0)
    assert [round(t, 6) for t, _ in d.fifo] == [10.001, 10.002, 10.003]


def test_queue_limit_drops_tail() -> None:
    d = Direction("up", Shaping(bw_mbit=12.0, queue_pkts=2), t0=0.0)
    for _ in range(5):
        d.admit(frame(1500), now=1.0)
    assert (len(d.fifo), d.drop_queue) == (2, 3)
    d.admit(frame(1500), now=1.0015)  # the first one has left the queue
    assert len(d.fifo) == 3 and d.drop_queue == 3


def test_jitter_never_reorders() -> None:
    d = Direction("up", Shaping(delay_ms=10, jitter_ms=8), t0=0.0)
    for i in range(2000):
        d.admit(frame(100), now=i * 1e-4)
    releases = [t for t, _ in d.fifo]
    assert releases == sorted(releases)
    assert min(releases[i] - i * 1e-4 for i in range(2000)) >= 0.002 - 1e-9
    assert max(r - i * 1e-4 for i, r in enumerate(releases)) <= 0.018 + 1e-9
    spaced = Direction("up", Shaping(delay_ms=10, jitter_ms=8), t0=0.0)
    for i in range(2000):  # packets far apart: the jitter is not masked by the ordering
        spaced.admit(frame(100), now=i * 0.05)
    mean = sum(t - i * 0.05 for i, (t, _) in enumerate(spaced.fifo)) / 2000
    assert 0.0095 < mean < 0.0105


def test_loss_is_random_per_packet() -> None:
    d = Direction("up", Shaping(loss_pct=5), t0=0.0)
    for i in range(40000):
        d.admit(frame(100), now=i * 1e-5)
    assert abs(d.drop_loss / 40000 - 0.05) < 0.006
    assert d.pkts_in == 40000 and len(d.fifo) == 40000 - d.drop_loss


def test_mahimahi_opportunities(tmp_path: Path) -> None:
    trace = tmp_path / "t.up"
    trace.write_text("2\n2\n5\n10\n")  # period 10 ms; offsets 0, 2, 2, 5
    d = Direction("up", Shaping(trace=trace, format="mahimahi"), t0=100.0)
    for _ in range(5):
        d.admit(frame(1500), now=100.0)
    assert [round(t - 100.0, 6) for t, _ in d.fifo] == [0.0, 0.002, 0.002, 0.005, 0.01]
    d2 = Direction("up", Shaping(trace=trace, format="mahimahi"), t0=0.0)
    for _ in range(4):  # 1000-byte packets: the second one spans two opportunities
        d2.admit(frame(1000), now=0.001)
    assert [round(t, 6) for t, _ in d2.fifo] == [0.002, 0.002, 0.002, 0.005]
    d2.admit(frame(100), now=0.0061)  # 900 bytes left at 5 ms are lost: next is 10 ms
    assert round(d2.fifo[-1][0], 6) == 0.01


def test_csv_steps_add_delay_and_loss(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("time_s,bw_mbit,delay_ms,loss_pct\n0,12,5,0\n1,12,50,100\n")
    d = Direction("up", Shaping(trace=trace, format="csv", delay_ms=1), t0=0.0)
    d.admit(frame(1500), now=0.5)
    assert d.fifo[-1][0] >= 0.5 + 0.006
    assert d.fifo[-1][0] < 0.5 + 0.006 + 0.002
    d.admit(frame(1500), now=1.5)
    assert d.drop_loss == 1


# --- real namespaces ---------------------------------------------------------------------

def _leftovers(tag: str) -> list[str]:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [ln for ln in (ns + links).splitlines() if f"tbt-{tag}" in ln or f"tbt{tag}" in ln]


@MEASURED
@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("mbit", [1, 10, 50, 200])
def test_rate_within_5pct(mbit: int) -> None:
    """Within 5 % both ways up to 50 Mbit/s.  200 Mbit/s is two thirds of the link process's ceiling
    on a 2-core VM (``net/capabilities.py``), and whether it gets there is the host's doing: here
    137-193 Mbit/s with 24-44 % of the CPU time stolen while it ran.  That is a capacity figure of
    the machine (the ceiling, measured in bench), so at 200 only the limit itself is checked."""
    s = Shaping(bw_mbit=mbit, delay_ms=1)
    with netns_link(s, s) as link:
        got = probe.measure_throughput(link.run1, link.run2, link.ip2, 4)
    print(f"rate {mbit} Mbit/s: TCP goodput {got:.2f} (expected {mbit * TCP_SHARE:.2f})")
    assert got - mbit * TCP_SHARE <= 0.05 * mbit  # never above the rate
    if mbit <= 50:
        assert mbit * TCP_SHARE - got <= 0.05 * mbit


@MEASURED
@pytest.mark.root
@pytest.mark.slow
def test_rtt_matches_two_way_delay() -> None:
    with netns_link(Shaping(delay_ms=15), Shaping(delay_ms=15)) as link:
        rtt = probe.measure_rtt(link.run1, link.ip2, count=20)
    assert abs(rtt["avg"] - 30.0) <= 2.0, rtt
    assert rtt["min"] >= 30.0 - 0.1


@MEASURED
@pytest.mark.root
@pytest.mark.slow
def test_loss_5pct(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    with netns_link(Shaping(loss_pct=5), Shaping(), stats_path=stats) as link:
        lost = probe.measure_loss(link.run1, link.run2, link.ip2, rate_mbit=20, seconds=4)
    assert abs(lost - 5.0) <= 1.0
    up = json.loads(stats.read_text())["up"]
    assert abs(up["dropped_loss"] / up["pkts_in"] - 0.05) <= 0.01


@MEASURED
@pytest.mark.root
@pytest.mark.slow
def test_asymmetric_up_down() -> None:
    with netns_link(Shaping(bw_mbit=20, delay_ms=5), Shaping(bw_mbit=4, delay_ms=5)) as link:
        up = probe.measure_throughput(link.run1, link.run2, link.ip2, 3)
        down = probe.measure_throughput(link.run2, link.run1, link.ip1, 3)
    assert abs(up - 20 * TCP_SHARE) <= 0.05 * 20
    assert abs(down - 4 * TCP_SHARE) <= 0.05 * 4


@pytest.mark.root
@pytest.mark.slow
def test_queue_limit_drops(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    with netns_link(Shaping(bw_mbit=10, queue_pkts=20), Shaping(), stats_path=stats) as link:
        lost = probe.measure_loss(link.run1, link.run2, link.ip2, rate_mbit=20, seconds=3)
    up = json.loads(stats.read_text())["up"]
    assert 40 <= lost <= 60  # twice the capacity offered: about half is dropped
    assert up["dropped_loss"] == 0
    assert abs(up["dropped_queue"] / up["pkts_in"] - 0.5) <= 0.1


@MEASURED
@pytest.mark.root
@pytest.mark.slow
def test_queue_limit_bounds_delay() -> None:
    """20 packets at 10 Mbit/s: under a saturating flow the queueing delay stays <= ~24 ms.

    The flow is TCP: it keeps the queue near its limit while losing only what overflows, so the pings
    that measure the delay mostly get through (a UDP flood at twice the rate drops most of them too)."""
    with netns_link(Shaping(bw_mbit=10, queue_pkts=20), Shaping()) as link:
        server = link.run2(["iperf3", "-s", "-1", "-p", "5301"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        flood = link.run1(["iperf3", "-c", link.ip2, "-t", "6", "-p", "5301"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2.0)
            rtt = probe.measure_rtt(link.run1, link.ip2, count=30, interval=0.05)
        finally:
            for p in (flood, server):
                p.kill()
                p.wait()
    # the limit holds the mean within the bound (an unbounded queue under TCP would grow to hundreds
    # of ms); a single reply may wait out a vCPU the hypervisor took (46 ms once, with 23 % stolen)
    assert rtt["avg"] <= 30.0, rtt
    assert rtt["max"] <= 60.0, rtt
    assert rtt["avg"] >= 5.0, rtt  # the queue did fill: an idle 10 Mbit/s link answers in well under 1 ms


def assert_tracks_trace(got: list[float], trace, launch_offset_s: float) -> None:
    """Each second's UDP goodput within 10 % of the trace's capacity in that second.

    The flow starts ~50 ms after the client is launched (start-up and control handshake);
    goodput is the payload share of each 1500-byte packet.
    A second that follows a change of rate may still carry part of the second before it (a late
    start on a loaded machine shifts the windows): each second lies within 10 % of the range
    between its own capacity and the previous one's."""
    cap = trace.capacity_mbit_per_s(len(got), launch_offset_s + 0.05)
    want = [c * probe.UDP_PAYLOAD / UDP_IP_BYTES for c in cap]
    for i, g in enumerate(got):
        lo, hi = sorted((want[i], want[max(i - 1, 0)]))
        assert 0.9 * lo <= g <= 1.1 * hi, f"second {i}: got {got}, trace {want}"


@MEASURED
@pytest.mark.root
@pytest.mark.slow
def test_mahimahi_trace_replay_per_second(tmp_path: Path) -> None:
    trace_path = TRACES / "TMobile-LTE-short.up"
    if not trace_path.exists():
        pytest.skip(f"{trace_path} missing")
    stats = tmp_path / "stats.json"
    seconds = 8
    with netns_link(Shaping(trace=trace_path, format="mahimahi"), Shaping(), stats_path=stats) as link:
        started = json.loads(stats.read_text())["started_unix"]
        launched = time.time()
        got = probe.measure_timeline(link.run1, link.run2, link.ip2, rate_mbit=15, seconds=seconds)
    assert len(got) >= seconds - 1
    assert_tracks_trace(got, load_trace(trace_path), launched - started)


@MEASURED
@pytest.mark.root
@pytest.mark.slow
def test_csv_trace_steps(tmp_path: Path) -> None:
    trace_path = tmp_path / "steps.csv"
    trace_path.write_text("time_s,bw_mbit\n0,8\n2,3\n")  # period 4 s: 2 s at 8, 2 s at 3
    stats = tmp_path / "stats.json"
    with netns_link(Shaping(trace=trace_path, format="csv"), Shaping(), stats_path=stats) as link:
        started = json.loads(stats.read_text())["started_unix"]
        launched = time.time()
        got = probe.measure_timeline(link.run1, link.run2, link.ip2, rate_mbit=12, seconds=6)
    assert_tracks_trace(got, load_trace(trace_path, "csv"), launched - started)


@pytest.mark.root
@pytest.mark.slow
def test_stats_written_on_sigterm_and_no_leftovers(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    tag = "s" + str(int(time.time() * 1000) % 100000)
    with netns_link(Shaping(delay_ms=2), Shaping(delay_ms=2), stats_path=stats, tag=tag) as link:
        assert probe.measure_rtt(link.run1, link.ip2, count=5, interval=0.02)["replies"] == 5
        link.proc.send_signal(signal.SIGTERM)
        assert link.proc.wait(5) == 0
        data = json.loads(stats.read_text())
        proc = link.proc
    assert data["up"]["pkts_out"] >= 6 and data["down"]["pkts_out"] >= 6
    assert data["up"]["bytes_in"] >= data["up"]["bytes_out"] > 0
    assert proc.poll() is not None
    assert _leftovers(tag) == []


@pytest.mark.root
@pytest.mark.slow
def test_control_channel_and_end_of_input() -> None:
    """A control line changes a direction while the link runs; closing the channel (its owner is
    gone) stops the link process."""
    with netns_link(Shaping(delay_ms=2), Shaping(delay_ms=2)) as link:
        before = probe.measure_rtt(link.run1, link.ip2, count=5, interval=0.05)
        link.proc.stdin.write(b'{"up": {"delay_ms": 40}}\n')
        link.proc.stdin.flush()
        time.sleep(0.2)
        after = probe.measure_rtt(link.run1, link.ip2, count=5, interval=0.05)
        link.proc.stdin.close()
        assert link.proc.wait(timeout=5) == 0
    assert before["avg"] < 10 and 40 <= after["min"] < 55, (before, after)


@pytest.mark.root
def test_start_fails_cleanly_on_missing_interface() -> None:
    with pytest.raises(RuntimeError, match="did not start"):
        start_link_process("tbtnosuch0a", "tbtnosuch0b", Shaping(), Shaping())


def test_bad_shaping_json_is_one_line() -> None:
    res = _linkproc("--iface-a", "tbx", "--iface-b", "tby", "--up", '{"bw_mbit": 1, "nope": 2}')
    assert res.returncode != 0
    assert res.stderr.strip().startswith("linkproc: --up: bad shaping JSON")


def _linkproc(*args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "testbed.net.shaping.linkproc", *args]
    return subprocess.run(argv, capture_output=True, text=True)


def test_refuses_interfaces_outside_the_testbed() -> None:
    res = _linkproc("--iface-a", "lo", "--iface-b", "tbx")
    assert res.returncode != 0
    assert res.stderr.strip() == "linkproc: --iface-a: 'lo' is not a testbed interface (tb...)"


def test_missing_trace_is_one_line(tmp_path: Path) -> None:
    gone = tmp_path / "gone.up"
    up = json.dumps(Shaping(trace=gone, format="mahimahi").to_dict())
    res = _linkproc("--iface-a", "tbx", "--iface-b", "tby", "--up", up)
    assert res.returncode == 2
    assert res.stderr.strip() == f"linkproc: --up: trace: {gone}: trace file not found"
