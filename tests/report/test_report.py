"""`testbed report` on the committed real results (bench/results/): plots and summary."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.experiments.results import read_records
from testbed.report.commands import make_report
from testbed.spec.errors import SpecError

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench/results"


def copy_results(name: str, tmp_path: Path) -> Path:
    out = tmp_path / name
    out.mkdir()
    shutil.copy(RESULTS / name / "results.jsonl", out / "results.jsonl")
    return out


def test_split_inference_report(tmp_path):
    out = copy_results("split-inference", tmp_path)
    summary, pngs = make_report(out)
    assert {p.name for p in pngs} >= {
        "latency_vs_uplink.png",
        "bytes_per_token.png",
        "measured_vs_predicted.png",
    }
    for p in pngs:
        assert p.stat().st_size > 20_000
    text = summary.read_text()
    assert "When does end-edge cooperation win?" in text
    assert "**split cut=2 int8**" in text and "on-device" in text
    for rec in read_records(out / "results.jsonl"):  # one table row per point, baselines included
        assert f"| {rec['point']} |" in text
    kinds = {r["kind"] for r in read_records(out / "results.jsonl")}
    assert kinds == {"on-device", "edge-offload", "cloud-offload", "split"}


def test_kv_cache_report(tmp_path):
    out = copy_results("kv-cache", tmp_path)
    _, pngs = make_report(out)
    assert "kv_cache.png" in {p.name for p in pngs}


def test_report_cli_on_a_missing_dir_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "testbed", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{tmp_path / 'nope'}: results.jsonl: no results here (run `testbed run SUITE --out DIR` first)"
    ]


def test_report_ignores_a_torn_last_line(tmp_path):
    out = copy_results("kv-cache", tmp_path)
    n = len(read_records(out / "results.jsonl"))
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"point": "torn')
    summary, _ = make_report(out)
    assert f"{n} records" in summary.read_text()


def test_empty_results_are_an_error(tmp_path):
    (tmp_path / "results.jsonl").write_text("")
    with pytest.raises(SpecError, match="empty"):
        make_report(tmp_path)


def repeated(name: str, tmp_path: Path, factors: tuple[float, ...]) -> tuple[Path, list[dict]]:
    """The committed records of ``name`` as len(factors) repeats, TTFT and mean latency scaled by each."""
    from testbed.experiments.results import append_record

    src = read_records(RESULTS / name / "results.jsonl")
    out = tmp_path / name
    out.mkdir()
    for rec in src:
        for k, f in enumerate(factors):
            r = copy.deepcopy(rec)
            r["repeat"] = k
            r["metrics"]["ttft_ms"] = rec["metrics"]["ttft_ms"] * f
            r["metrics"]["token_latency_ms"]["mean"] = rec["metrics"]["token_latency_ms"]["mean"] * f
            append_record(out / "results.jsonl", r)
    return out, src


def cells(text: str, point: str) -> list[str]:
    row = next(line for line in text.splitlines() if line.startswith(f"| {point} |"))
    return [c.strip() for c in row.split("|")[1:-1]]


def test_summary_shows_median_and_range_over_repeats(tmp_path):
    out, src = repeated("multi-device", tmp_path, (1.0, 0.8, 1.5))
    summary, pngs = make_report(out)
    text = summary.read_text()
    header = cells(text, "point")
    assert header[:4] == ["point", "runs", "TTFT, median (min–max)", "per token mean, median (min–max)"]
    assert header[4:8] == ["per token p50 (pooled)", "p95 (pooled)", "p99 (pooled)", "tokens"]
    for rec in src:
        row = cells(text, rec["point"])
        t = rec["metrics"]["ttft_ms"]
        assert row[1] == "3/3"
        assert row[2] == f"{t:,.1f} ({0.8 * t:,.1f}–{1.5 * t:,.1f})"
        decode = sum(len(s["raw"]["token_ms"]) - 1 for s in rec["sessions"])
        assert int(row[7]) == 3 * decode  # every decode step of every session and repeat
        p50, p95, p99 = (float(c.replace(",", "")) for c in row[4:7])
        assert 0 < p50 <= p95 <= p99
    assert "devices.png" in {p.name for p in pngs}


def test_one_repeat_shows_no_range(tmp_path):
    out, src = repeated("multi-device", tmp_path, (1.0,))
    text = make_report(out)[0].read_text()
    t = src[0]["metrics"]["ttft_ms"]
    assert cells(text, src[0]["point"])[1:3] == ["1/1", f"{t:,.1f}"]


def test_report_skips_a_corrupt_line_with_one_warning(tmp_path):
    out = copy_results("kv-cache", tmp_path)
    path = out / "results.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3][: len(lines[3]) // 2] + b"\n"  # a record cut in half, the file goes on
    path.write_bytes(b"".join(lines))
    warned: list[str] = []
    summary, _ = make_report(out, warned.append)
    assert len(warned) == 1 and warned[0].startswith(f"{path}:4: skipped a corrupt line (not JSON")
    assert f"{len(lines) - 1} records" in summary.read_text()
    proc = subprocess.run([sys.executable, "-m", "testbed", "report", str(out)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"warning: {warned[0]}"]


def test_report_with_no_usable_record_is_one_line(tmp_path):
    (tmp_path / "results.jsonl").write_bytes(b"garbage\n\x00\x00\n")
    proc = subprocess.run([sys.executable, "-m", "testbed", "report", str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"{tmp_path / 'results.jsonl'}: records: no usable record (2 lines skipped, "
                               f"the first: {tmp_path / 'results.jsonl'}:1: skipped a corrupt line")
