"""The probe library against real namespaces joined by the userspace link process."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from testbed.net import probe
from testbed.net.shaping.userspace import netns_link
from testbed.spec.topology import Shaping
from testbed.spec.traces import load_trace
from tests.measured import MEASURED

MAHIMAHI = Path(__file__).resolve().parents[3] / "shared/traces/mahimahi"

TCP_SHARE = 1448 / 1500
UDP_SHARE = probe.UDP_PAYLOAD / (probe.UDP_PAYLOAD + 28)

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _pids_of(ns: str) -> list[str]:
    return subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()


@MEASURED
def test_probe_asymmetric_link_both_ways() -> None:
    up = Shaping(bw_mbit=12, delay_ms=10)
    down = Shaping(bw_mbit=3, delay_ms=5, loss_pct=1)
    with netns_link(up, down) as link:
        t_up = time.monotonic()
        res = probe.probe(link.run1, link.run2, link.ip1, link.ip2, seconds=3, timeline=True,
                          up_hint_mbit=12, down_hint_mbit=3)
        took = time.monotonic() - t_up
        left = _pids_of(link.ns1) + _pids_of(link.ns2)
    assert left == []  # every iperf3 server and client is gone
    assert abs(res["up_mbit"] - 12 * TCP_SHARE) <= 0.05 * 12  # lost ACKs barely matter
    # 1 % random loss may cost cubic some goodput on the down side, never more than the rate
    assert 0.6 * 3 * TCP_SHARE <= res["down_mbit"] <= 3 * TCP_SHARE + 0.05 * 3
    assert abs(res["rtt_ms"] - 15.0) <= 2.0
    assert res["rtt"]["replies"] >= 17  # 20 pings, 1 % loss on the way back
    assert res["loss_up_pct"] <= 0.5
    # the down loss probe is small: 1.5 Mbit/s x 3 s = ~390 datagrams, binomial sigma ~0.5 pp at 1 %;
    # allow 3 sigma (the +-1 pp fidelity target is asserted on large samples in test_linkproc/test_cli_probe)
    assert abs(res["loss_down_pct"] - 1.0) <= 1.5
    # saturating UDP at 1.5x the hint: each full second carries the rate's payload share
    for got, rate in ((res["up_timeline"], 12), (res["down_timeline"], 3 * 0.99)):
        assert len(got) >= 2
        for g in got[1:]:
            assert abs(g - rate * UDP_SHARE) <= 0.10 * rate, got  # per-second, as for traces
    # the timelines run last: after four 3 s tests (plus set-up), the down one after the up one
    up_t0, down_t0 = res["up_timeline_started"] - t_up, res["down_timeline_started"] - t_up
    assert 12 <= up_t0 < down_t0 - 3 and down_t0 + 3 <= took, res


@MEASURED
def test_no_timeline_unless_asked() -> None:
    with netns_link(Shaping(bw_mbit=20), Shaping(bw_mbit=20)) as link:
        plain = probe.probe(link.run1, link.run2, link.ip1, link.ip2, seconds=1)
    assert not [k for k in plain if "timeline" in k], plain
    assert abs(plain["up_mbit"] - 20 * TCP_SHARE) <= 1 and abs(plain["down_mbit"] - 20 * TCP_SHARE) <= 1


@MEASURED
def test_timeline_follows_the_rate() -> None:
    with netns_link(Shaping(bw_mbit=6), Shaping()) as link:
        got = probe.measure_timeline(link.run1, link.run2, link.ip2, rate_mbit=10, seconds=3)
    assert len(got) == 3
    assert all(abs(g - 6 * UDP_SHARE) <= 0.3 for g in got), got


@MEASURED
def test_loss_below_capacity_is_zero_on_a_clean_link() -> None:
    with netns_link(Shaping(bw_mbit=20), Shaping(bw_mbit=20)) as link:
        assert probe.measure_loss(link.run1, link.run2, link.ip2, rate_mbit=10, seconds=2) <= 0.2


def test_unreachable_destination_raises() -> None:
    with netns_link(Shaping(), Shaping()) as link:
        with pytest.raises(probe.ProbeError, match="no reply"):
            probe.measure_rtt(link.run1, "10.254.254.254", count=2, interval=0.2)
        with pytest.raises(probe.ProbeError):
            probe.measure_throughput(link.run1, link.run2, "10.254.254.254", 1)


@MEASURED
@pytest.mark.skipif(not MAHIMAHI.is_dir(), reason="shared Mahimahi traces not present")
def test_timeline_start_lines_up_with_the_replayed_trace(tmp_path: Path) -> None:
    """The start estimate, against the link process's own record of when its replay began."""
    trace_file = MAHIMAHI / "TMobile-LTE-short.up"
    trace = load_trace(trace_file, "mahimahi")
    stats = tmp_path / "stats.json"
    with netns_link(Shaping(trace=trace_file, format="mahimahi", queue_pkts=100), Shaping(),
                    stats_path=stats) as link:
        replay_unix = json.loads(stats.read_text())["started_unix"]  # written just before trace time 0
        clock_t0 = time.monotonic() - (time.time() - replay_unix)  # the same instant on our clock
        time.sleep(3)
        tl = probe.measure_timeline_started(link.run1, link.run2, link.ip2, rate_mbit=40, seconds=6)
    t0 = tl.started - clock_t0
    assert 3 <= t0 <= 6, t0
    want = np.array(trace.capacity_mbit_per_s(len(tl.mbit), start_s=t0)) * UDP_SHARE
    err = np.abs(np.array(tl.mbit) - want) / np.maximum(want, 0.5)
    assert len(tl.mbit) == 6 and err.mean() <= 0.10 and err.max() <= 0.25, (t0, tl.mbit, want)


def test_probe_over_a_link_that_carries_nothing_reports_notes(tmp_path: Path) -> None:
    """A trace with one delivery opportunity a minute: every test stops at its deadline and the
    probe returns figures (nothing delivered) and a note per direction, never an error."""
    trace = tmp_path / "out.up"
    trace.write_text("59999\n")
    with netns_link(Shaping(trace=trace, format="mahimahi"), Shaping(bw_mbit=20)) as link:
        t0 = time.monotonic()
        res = probe.probe(link.run1, link.run2, link.ip1, link.ip2, seconds=1, grace_s=1)
        took = time.monotonic() - t0
        assert _pids_of(link.ns1) == [] and _pids_of(link.ns2) == []  # no iperf3 or ping left behind
    assert res["up_mbit"] == 0.0 and res["down_mbit"] == 0.0  # down's handshake needs the up way too
    assert res["rtt_ms"] is None and res["rtt"]["replies"] == 0
    assert res["loss_up_pct"] == 100.0 and res["loss_down_pct"] == 100.0
    for way in ("up", "down"):
        notes = res["notes"][way]
        assert any(n.startswith("TCP test ") for n in notes), notes
        assert any(n.startswith("UDP test ") for n in notes), notes
    assert any(n.startswith("ping:") for n in res["notes"]["up"])
    assert took < 40  # deadlines of 2-4 s per test, not minutes
