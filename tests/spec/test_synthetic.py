"""Gilbert-Elliott synthetic traces: deterministic, and carrying the configured rates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testbed.spec.synthetic import GilbertElliott, mahimahi_stamps, write_trace
from testbed.spec.traces import load_trace

REPO = Path(__file__).resolve().parents[2]
PACKET_MBIT_PER_100MS = 1500 * 8 / 100 / 1000  # one packet in a 100 ms bin, in Mbit/s


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    model = GilbertElliott()
    for fmt in ("mahimahi", "csv"):
        a, b, c = (tmp_path / f"{n}.{fmt}" for n in "abc")
        write_trace(a, model, 20, seed=7, fmt=fmt)
        write_trace(b, model, 20, seed=7, fmt=fmt)
        write_trace(c, model, 20, seed=8, fmt=fmt)
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() != c.read_bytes()


def test_long_run_mean_matches_the_configured_chain(tmp_path: Path) -> None:
    model = GilbertElliott(good_mbit=10, bad_mbit=1, p_good_bad=0.05, p_bad_good=0.2)
    assert model.stationary_mean_mbit() == pytest.approx(0.8 * 10 + 0.2 * 1)
    path = tmp_path / "long.up"
    rates = write_trace(path, model, 600, seed=1)
    trace = load_trace(path)
    assert trace.period_ms == 600_000
    assert trace.mean_mbit() == pytest.approx(model.stationary_mean_mbit(), rel=0.04)
    assert trace.mean_mbit() == pytest.approx(rates.mean(), rel=0.001)
    good = rates == model.good_mbit
    assert good.mean() == pytest.approx(model.stationary_good(), abs=0.03)
    # mean sojourn: 1 / p_good_bad = 20 bins good, 1 / p_bad_good = 5 bins bad
    bounds = np.r_[0, np.flatnonzero(good[1:] != good[:-1]) + 1, good.size]
    lengths, run_good = np.diff(bounds), good[bounds[:-1]]
    assert lengths[run_good].mean() == pytest.approx(20, rel=0.2)
    assert lengths[~run_good].mean() == pytest.approx(5, rel=0.2)


def test_mahimahi_bins_follow_the_state_sequence(tmp_path: Path) -> None:
    model = GilbertElliott(good_mbit=24, bad_mbit=3, p_good_bad=0.1, p_bad_good=0.3)
    path = tmp_path / "g.up"
    rates = write_trace(path, model, 30, seed=4)
    bins = load_trace(path).rate_bins_mbit(100)
    assert bins.size == rates.size == 300
    assert set(np.unique(rates)) == {24.0, 3.0}
    # stamps are ceiled to the ms: at most one packet moves into the next bin (plus the end stamp)
    assert np.abs(bins - rates).max() <= 2 * PACKET_MBIT_PER_100MS + 1e-9


def test_csv_trace_has_exact_steps_period_delay_and_loss(tmp_path: Path) -> None:
    model = GilbertElliott(good_mbit=100, bad_mbit=10, p_good_bad=0.1, p_bad_good=0.3,
                           good_delay_ms=4, bad_delay_ms=20, bad_loss_pct=0.5)
    path = tmp_path / "m.csv"
    rates = write_trace(path, model, 60, seed=3, fmt="csv")
    trace = load_trace(path)
    assert trace.period_ms == 60_000
    assert trace.rate_bins_mbit(100) == pytest.approx(rates)
    assert trace.mean_mbit() == pytest.approx(rates.mean())
    for i in range(0, rates.size, 7):
        step = trace.step_at(i * 0.1 + 0.05)
        assert step.bw_mbit == rates[i]
        assert step.delay_ms == (4 if rates[i] == 100 else 20)
        assert step.loss_pct == (None if rates[i] == 100 else 0.5)


def test_outage_state_and_single_bin() -> None:
    stamps = mahimahi_stamps(np.array([12.0, 0.0, 12.0]), 100.0)
    assert stamps[-1] == 300
    assert not np.any((stamps > 100) & (stamps <= 200))
    assert stamps.size == 200


def test_shipped_traces_are_small_and_valid() -> None:
    traces = REPO / "topologies/traces"
    for name in ("ge-lte.up", "ge-lte.down", "markov-5g.csv"):
        path = traces / name
        assert path.stat().st_size < 1_000_000
        t = load_trace(path)
        assert t.period_ms <= 60_000
        assert name in (traces / "README.md").read_text()


def test_cli_trace_gen_writes_the_documented_trace(tmp_path: Path) -> None:
    out = tmp_path / "ge.up"
    cmd = [sys.executable, "-m", "testbed", "trace-gen", str(out), "--seconds", "30", "--good-mbit", "8",
           "--bad-mbit", "1", "--p-good-bad", "0.05", "--p-bad-good", "0.2", "--seed", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}: mahimahi, 30 s, mean 6.60 Mbit/s" in r.stdout
    assert out.read_bytes() == (REPO / "topologies/traces/ge-lte.up").read_bytes()


@pytest.mark.parametrize(("args", "expected"), [
    (["--seconds", "0"], "trace-gen: --seconds: must be > 0 (got 0)"),
    (["--seconds", "1e5"], "trace-gen: --seconds: must be <= 3600 (one hour) (got 1e5)"),
    (["--seconds", "soon"], "trace-gen: --seconds: must be a finite number (got 'soon')"),
    (["--seed", "1.5"], "trace-gen: --seed: must be an integer >= 0 (got 1.5)"),
    (["--bin-ms", "2000", "--seconds", "1"],
     "trace-gen: --bin-ms: must be <= --seconds x 1000 (1000) (got 2000)"),
    (["--format", "pcap"], "trace-gen: --format: must be one of mahimahi, csv (got 'pcap')"),
    (["--p-good-bad", "1.5"], "trace-gen: --p-good-bad: must be <= 1 (got 1.5)"),
    (["--good-mbit", "-1"], "trace-gen: --good-mbit: must be > 0 (got -1)"),
    (["--bad-delay-ms", "5"], "trace-gen: --bad-delay-ms: only the csv format carries delay/loss (got 5)"),
])
def test_cli_trace_gen_bad_flags(tmp_path: Path, args: list[str], expected: str) -> None:
    r = subprocess.run([sys.executable, "-m", "testbed", "trace-gen", str(tmp_path / "o"), *args],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip() == expected
    assert not (tmp_path / "o").exists()


def test_cli_validate_accepts_a_trace_file(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "testbed", "validate", "topologies/traces/ge-lte.up"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("OK: mahimahi trace, period 30 s, 16500 delivery opportunities, "
                                     "mean 6.60 Mbit/s")
    bad = tmp_path / "bad.up"
    bad.write_text("5\n3\n")
    r = subprocess.run([sys.executable, "-m", "testbed", "validate", str(bad)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip() == f"{bad}: trace: {bad} line 2: timestamps must not decrease (got 3 after 5)"
