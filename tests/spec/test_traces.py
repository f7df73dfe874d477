"""Trace parsing (mahimahi and CSV) and the capacity figures derived from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from testbed.spec.errors import SpecError
from testbed.spec.traces import MTU_BYTES, TraceStep, infer_format, load_trace

REAL = Path(__file__).resolve().parents[3] / "shared/traces/mahimahi"
REAL_FILES = sorted(REAL.glob("*-LTE-short.*")) if REAL.is_dir() else []


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_single_line_one_is_twelve_mbit(tmp_path: Path) -> None:
    t = load_trace(write(tmp_path, "one", "1\n"))
    assert t.format == "mahimahi"
    assert t.period_ms == 1.0
    assert t.opportunities_ms.tolist() == [0.0]
    assert t.mean_mbit() == pytest.approx(12.0)
    assert t.capacity_mbit_per_s(3) == pytest.approx([12.0, 12.0, 12.0])
    assert t.rate_bins_mbit(100) == pytest.approx([12.0])
    assert t.steps == [] and t.step_at(0.5) is None


def test_repeated_stamps_are_several_packets(tmp_path: Path) -> None:
    # 0,0,5: two packets at 0 and one at 5 == offset 0 of the next loop -> 3 packets per 5 ms
    t = load_trace(write(tmp_path, "rep", "0\n0\n5\n"))
    assert t.period_ms == 5.0
    assert t.opportunities_ms.tolist() == [0.0, 0.0, 0.0]
    assert t.mean_mbit() == pytest.approx(3 * MTU_BYTES * 8 / 5 / 1000)


def test_bins_follow_the_trace_shape(tmp_path: Path) -> None:
    # 10 packets/ms for the first 100 ms, then 1 packet/ms for 100 ms
    stamps = [ms for ms in range(1, 101) for _ in range(10)] + list(range(101, 201))
    t = load_trace(write(tmp_path, "shape", "\n".join(map(str, stamps)) + "\n"))
    assert t.period_ms == 200
    bins = t.rate_bins_mbit(100)
    # [0, 100) holds the stamp 200 (wrapped to 0) and 99 ms x 10; [100, 200) holds 10 + 99
    assert bins == pytest.approx([991 * 12 / 100, 109 * 12 / 100])
    assert np.mean(t.capacity_mbit_per_s(4, start_s=0.3)) == pytest.approx(1100 * 12 / 200, rel=0.01)


@pytest.mark.skipif(not REAL_FILES, reason="shared/traces/mahimahi not checked out beside the repo")
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_real_traces_mean_capacity(path: Path) -> None:
    stamps = np.loadtxt(path, dtype=np.int64)
    t = load_trace(path)
    assert t.period_ms == stamps[-1]
    assert t.packets_per_period == stamps.size
    expected = stamps.size * MTU_BYTES * 8 / stamps[-1] / 1000  # Mbit/s
    assert t.mean_mbit() == pytest.approx(expected)
    seconds = int(t.period_ms // 1000)
    per_s = t.capacity_mbit_per_s(seconds)
    assert len(per_s) == seconds
    assert np.mean(per_s) == pytest.approx(expected, rel=0.02)
    assert np.all(np.diff(t.opportunities_ms) >= 0)
    assert t.opportunities_ms.min() >= 0 and t.opportunities_ms.max() < t.period_ms
    # looping: capacity over whole periods is exactly count * 12 kbit
    two = t.capacity_mbit_per_s(1, start_s=0) if t.period_ms == 1000 else None
    assert two is None or two[0] == pytest.approx(expected)


def test_csv_steps_period_and_opportunities(tmp_path: Path) -> None:
    p = write(tmp_path, "t.csv", "time_s,bw_mbit,delay_ms,loss_pct\n0,12,10,\n0.5,0\n1,24,,1  # comment\n")
    t = load_trace(p)
    assert t.format == "csv"
    assert t.period_ms == 1500.0  # last time (1 s) + previous interval (0.5 s)
    assert t.steps == [TraceStep(0.0, 12.0, 10.0, None), TraceStep(0.5, 0.0, None, None),
                       TraceStep(1.0, 24.0, None, 1.0)]
    # 12 Mbit/s for 500 ms = 500 packets; 24 Mbit/s for 500 ms = 1000 packets
    assert t.packets_per_period == 1500
    assert np.count_nonzero((t.opportunities_ms > 0) & (t.opportunities_ms <= 500)) == 500
    assert np.count_nonzero((t.opportunities_ms > 500) & (t.opportunities_ms <= 1000)) == 0
    assert t.mean_mbit() == pytest.approx(12.0)
    assert t.rate_bins_mbit(250) == pytest.approx([12, 12, 0, 0, 24, 24])
    assert t.capacity_mbit_per_s(3) == pytest.approx([6.0, 18.0, 12.0])
    assert t.step_at(0.7).bw_mbit == 0.0
    assert t.step_at(1.6) == t.steps[0]  # looped
    assert t.step_at(2.6).loss_pct == 1.0


def test_csv_single_row_has_one_second_period(tmp_path: Path) -> None:
    t = load_trace(write(tmp_path, "flat.csv", "0,6\n"))
    assert t.period_ms == 1000.0
    assert t.packets_per_period == 500
    assert t.capacity_mbit_per_s(2, start_s=0.25) == pytest.approx([6.0, 6.0])


def test_format_inference_and_override(tmp_path: Path) -> None:
    assert infer_format(Path("a/b.CSV")) == "csv"
    assert infer_format(Path("a/b.up")) == "mahimahi"
    p = write(tmp_path, "rates.txt", "0,12\n")
    assert load_trace(p, "csv").mean_mbit() == pytest.approx(12.0)


MAHIMAHI_BAD = [
    ("1\n2\nx\n", "line 3: expected an integer millisecond timestamp (got 'x')"),
    ("1\n2.5\n", "line 2: expected an integer"),
    ("0\n5\n\n3\n", "line 4: timestamps must not decrease (got 3 after 5)"),
    ("1\n-2\n", "line 2: "),
    ("1 2\n3\n", "line 1: expected one timestamp per line"),
    ("", "no delivery opportunity"),
    ("0\n0\n", "no delivery opportunity"),
    ("1\n" * 9000, "mean rate must be <= 100000 Mbit/s (100 Gbit/s) (got 108000 Mbit/s: 9000 packets in 1 "),
]

CSV_BAD = [
    ("time_s,bw_mbit\n1,5\n", "line 2: the first row must be at time_s 0 (got 1)"),
    ("0,5\n2,5\n2,6\n", "line 3: time_s must increase (got 2 after 2)"),
    ("0,-5\n", "line 1: bw_mbit must be >= 0 (got -5)"),
    ("0,5,-1\n", "line 1: delay_ms must be >= 0 (got -1)"),
    ("0,5,1,150\n", "line 1: loss_pct must be <= 100 (got 150)"),
    ("0,2e5\n", "line 1: bw_mbit must be <= 100000 (100 Gbit/s) (got 200000)"),
    ("0,5,1e5\n", "line 1: delay_ms must be <= 10000 (10 s) (got 100000)"),
    ("0\n", "line 1: expected time_s,bw_mbit[,delay_ms,loss_pct] (got 1 fields)"),
    ("0,fast\n", "line 1: bw_mbit must be a number (got 'fast')"),
    ("0,0\n1,0\n", "no delivery opportunity"),
    ("time_s,bw_mbit\n", "no delivery opportunity"),
]


@pytest.mark.parametrize(("text", "message"), MAHIMAHI_BAD)
def test_bad_mahimahi_names_file_field_and_line(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path, "bad.up", text)
    with pytest.raises(SpecError) as e:
        load_trace(p, source=Path("topo.yaml"), field="links[0].up.trace")
    assert str(e.value).startswith(f"topo.yaml: links[0].up.trace: {p}")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("text", "message"), CSV_BAD)
def test_bad_csv_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path, "bad.csv", text)
    with pytest.raises(SpecError) as e:
        load_trace(p)
    assert str(e.value).startswith(f"{p}: trace: {p}")
    assert message in str(e.value)


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"nope.up: trace: trace file not found$"):
        load_trace(tmp_path / "nope.up")


def test_reload_sees_a_changed_file(tmp_path: Path) -> None:
    p = write(tmp_path, "t.up", "1\n")
    assert load_trace(p).mean_mbit() == pytest.approx(12.0)
    p.write_text("2\n")
    assert load_trace(p).mean_mbit() == pytest.approx(6.0)
