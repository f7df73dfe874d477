"""`testbed report` on the committed real results (bench/results/): plots and summary."""

from __future__ import annotations

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
