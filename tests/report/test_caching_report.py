"""``testbed report`` of a caching suite: the four figures and the summary are drawn from real records
(a small replay suite on the tiny catalogue's manifests, run through the runner: three policies, two
capacities, two repeats)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest

from testbed.experiments.results import read_records
from testbed.experiments.runner import run_suite
from testbed.report.caching import byte_unit, greedy_pairs, greedy_ratio, is_caching, pooled_ttft
from testbed.report.commands import make_report
from testbed.report.data import load_rows
from testbed.spec.suite import load_suite

REPO = Path(__file__).resolve().parents[2]
FIGURES = {"cache_hit_ratio_vs_capacity.png", "cache_backhaul_per_policy.png", "cache_ttft_cdf.png",
           "cache_greedy_vs_optimum.png"}
SETS = ["workload.catalogue={base: tiny, adapters: 6, partial: 2, seed: 3}", "workload.requests=120",
        "sweep.policy=[lru, trimcaching, optimal]", "sweep.capacity_bases=[1.5, 3]", "params.window=60",
        "repeats=2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caching-report")
    run_suite(load_suite(REPO / "experiments/caching.yaml", SETS), out)
    return out


def test_figures_from_real_records(results):
    records = read_records(results / "results.jsonl")
    assert len(records) == 12 and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    assert is_caching(records)
    summary, pngs = make_report(results)
    assert {p.name for p in pngs} == FIGURES
    for p in pngs:
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 200
        assert img.std() > 0.01  # something is drawn, not an empty canvas
    text = summary.read_text()
    assert "(caching)" in text and "Generated variants (from a seed, not trained): 8 of 10 models" in text
    rows, _ = load_rows(results)
    assert len(rows) == 6
    scale, unit = byte_unit([r.median("backhaul_bytes") for r in rows])
    assert f"| backhaul {unit} |" in text
    for r in rows:  # each point's medians appear in its table row
        line = next(line for line in text.splitlines() if line.startswith(f"| {r.point} |"))
        assert line.split(" | ")[1] == "2/2"
        assert f"{r.median('hit_ratio'):.3f}" in line and f"{r.median('ttft_ms_p50'):.0f}" in line
        assert f"{r.median('backhaul_bytes') * scale:.2f}" in line
        assert pooled_ttft(r).size == 2 * 201  # both repeats' distributions
    for g, o in greedy_pairs(rows):  # the greedy-vs-optimum table: both hit ratios and their ratio
        line = next(line for line in text.splitlines() if line.startswith(f"| {g.point.partition('/')[2]} |"))
        assert f"{g.median('hit_ratio'):.3f}" in line and f"{o.median('hit_ratio'):.3f}" in line
        assert f"{greedy_ratio(g, o).median:.3f}" in line


def test_greedy_vs_optimum_pairs_the_same_requests(results):
    rows, _ = load_rows(results)
    pairs = greedy_pairs(rows)
    assert sorted(g.params["capacity_bases"] for g, _ in pairs) == [1.5, 3.0]
    for g, o in pairs:
        assert (g.placement_name, o.placement_name) == ("trimcaching", "optimal")
        by_repeat = {r["repeat"]: r for r in o.ok}
        for r in g.ok:  # a repeat of each served the same requests
            assert r["caching"]["workload_digest"] == by_repeat[r["repeat"]]["caching"]["workload_digest"]
        ratio = greedy_ratio(g, o)
        opt = {k: r["metrics"]["hit_ratio"] for k, r in by_repeat.items()}
        want = sorted(r["metrics"]["hit_ratio"] / opt[r["repeat"]] for r in g.ok)
        assert (ratio.lo, ratio.hi) == pytest.approx((want[0], want[-1]))
