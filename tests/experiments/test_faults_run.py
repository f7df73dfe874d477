"""A suite point with events and ``duration_s`` run for real (tiny model, userspace links): the record
keeps every event with its scheduled and actual time, the device sent its request in several rounds
until the duration had passed, an outage shows as a stall, and the report draws the events timeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.experiments.results import read_records
from testbed.experiments.runner import run_suite
from testbed.report.commands import make_report
from testbed.spec.suite import load_suite

REPO = Path(__file__).resolve().parents[2]

SUITE = f"""name: faults-short
topology: {REPO / 'topologies/two-node.yaml'}
model: tiny
workload: {{prompts: {REPO / 'experiments/prompts/short.yaml'}, max_new_tokens: 8}}
baselines: []
placements: {{split: "phone=0:1,mec=1:2"}}
params:
  prompt: capital
  duration_s: 3
  events:
    - {{at_s: 0.2, link: [phone, mec], down_for_s: 0.6}}
    - {{at_s: 1.0, link: [phone, mec], up: {{delay_ms: 30}}}}
    - {{at_s: 600, kill: mec}}
repeats: 1
shaper: userspace
"""


@pytest.mark.root
@pytest.mark.slow
def test_a_point_with_events_and_a_duration(tmp_path: Path) -> None:
    src = tmp_path / "faults-short.yaml"
    src.write_text(SUITE)
    out = tmp_path / "out"
    run_suite(load_suite(src), out)
    (rec,) = read_records(out / "results.jsonl")
    assert rec["status"] == "ok", rec.get("error")
    outage, change, kill = rec["events"]
    assert outage["kind"] == "outage" and outage["at_s"] <= outage["actual_s"] < outage["at_s"] + 1.0
    assert outage["end_s"] <= outage["actual_end_s"] < outage["end_s"] + 1.0
    assert change["kind"] == "change" and "error" not in change and change["actual_s"] >= 1.0
    assert kill["skipped"] and "actual_s" not in kill  # the run ended long before 600 s
    raw = rec["sessions"][0]["raw"]
    reqs = raw["requests"]
    assert len(reqs) >= 2 and all(r["tokens"] == reqs[0]["tokens"] for r in reqs)  # greedy: same text
    assert len(reqs[0]["tokens"]) == 8
    # the first round began at the events' 0; a later round's driver starts after the previous one
    # ended (its start-up is a gap), so a round that started before the duration may end after it
    t0 = rec["events_t0_s"]
    assert abs(reqs[0]["gen_start_s"] - t0) < 0.5
    assert all(a["gen_start_s"] < b["gen_start_s"] for a, b in zip(reqs, reqs[1:], strict=False))
    stall = (outage["actual_end_s"] - outage["actual_s"]) * 1e3
    assert max(reqs[0]["token_ms"]) >= 0.8 * stall, reqs[0]["token_ms"]  # the outage hit the first round
    _, pngs = make_report(out)
    assert "events_timeline.png" in {p.name for p in pngs}
