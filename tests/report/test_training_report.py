"""``testbed report`` of a training suite: the figures are drawn from real records (a tiny
split-training suite run over real namespaces and shaped links, two freezing ratios, 2 steps)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest

from testbed.experiments.results import read_records
from testbed.experiments.runner import run_suite
from testbed.report.commands import make_report
from testbed.report.data import load_rows
from testbed.report.training import is_training
from testbed.spec.suite import load_suite

REPO = Path(__file__).resolve().parents[2]
FIGURES = {"train_loss_vs_time.png", "train_loss_vs_bytes.png", "train_step_vs_hops.png",
           "train_latency_vs_freezing.png"}

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train-report")
    text = tmp / "text.txt"
    text.write_text(Path("/usr/share/common-licenses/GPL-3").read_text()[:6000])
    suite = load_suite(REPO / "experiments/split-training.yaml",
                       ["model=tiny", "sweep.cut=[1]", "sweep.freeze_client=[0,1]", "sweep.uplink_mbit=[50]",
                        "workload.steps=2", f"workload.data=[{text}]", "repeats=1"])
    run_suite(suite, tmp / "out", only="placement=split")  # the U-shaped point: test_training_suite.py
    return tmp / "out"


def test_figures_from_real_records(results):
    records = read_records(results / "results.jsonl")
    assert len(records) == 2 and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    assert is_training(records)
    summary, pngs = make_report(results)
    assert {p.name for p in pngs} == FIGURES
    for p in pngs:
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 200
        assert img.std() > 0.01  # something is drawn, not an empty canvas
    text = summary.read_text()
    assert "(training)" in text and "TTFT" not in text
    rows, _ = load_rows(results)
    for r in rows:  # each point's measured figures appear in its table row
        (rec,) = r.ok
        m = rec["metrics"]
        line = next(line for line in text.splitlines() if line.startswith(f"| {r.point} |"))
        assert f"{m['step_ms_mean']:.1f}" in line and f"{m['eval_ppl_after']:.1f}" in line


def test_frozen_client_sends_no_gradients_back(results):
    """The figure's two points differ as the freezing ratio says: a fully frozen device gets no
    activation gradients back, so its bytes per step are the uplink's only; it sends the same
    activations, plus its samples' ids (a small TRAIN_SAMPLES message per micro-batch, which lets the
    edge keep its smashed data for the next epoch)."""
    by_freeze = {r["params"]["freeze_client"]: r["metrics"] for r in read_records(results / "results.jsonl")}
    assert by_freeze[1.0]["bytes_down_per_step"] == 0 < by_freeze[0.0]["bytes_down_per_step"]
    extra = by_freeze[1.0]["bytes_up_per_step"] - by_freeze[0.0]["bytes_up_per_step"]
    assert 0 < extra <= 0.01 * by_freeze[0.0]["bytes_up_per_step"], extra
