"""``testbed run --resume`` over a results file a crash or a disk left damaged: not fatal, and the
point whose record was lost is planned again.  (The real re-run is in test_run_real.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.experiments.results import read_records
from testbed.experiments.runner import run_suite
from testbed.spec.suite import load_suite

REPO = Path(__file__).resolve().parents[2]
ONLY = "placement=on-device"  # one point of quick.yaml, one repeat


@pytest.fixture
def suite():
    return load_suite(REPO / "experiments/quick.yaml", ["model=tiny", "params.cut=1"])


class Stop(Exception):
    """Raised at the start of the first task: the test looks at the plan, not at a run."""


def test_resume_skips_a_corrupt_line_and_cuts_a_torn_one(tmp_path, suite):
    results = tmp_path / "results.jsonl"
    done = json.dumps({"point": "on-device", "repeat": 0, "status": "ok"}) + "\n"
    results.write_bytes(b"\x00\x00\x00\n" + done.encode() + b'{"point": "split/uplink_mbit=2", "re')
    warnings: list[str] = []
    starts: list[int] = []
    run_suite(suite, tmp_path, resume=True, only=ONLY, on_start=starts.append, on_warning=warnings.append)
    assert starts == [0]  # the on-device record survived: nothing to run
    assert [w.split(": skipped")[0] for w in warnings] == [f"{results}:1", f"{results}:3"]
    assert results.read_bytes() == b"\x00\x00\x00\n" + done.encode()  # torn tail cut, the rest kept


def test_the_point_of_a_torn_record_runs_again(tmp_path, suite):
    results = tmp_path / "results.jsonl"
    results.write_bytes(json.dumps({"point": "on-device", "repeat": 0, "status": "ok"}).encode()[:20])
    started: list[tuple[str, int]] = []
    warnings: list[str] = []

    def on_task(point, repeat, rec):
        started.append((point.id, repeat))
        raise Stop

    with pytest.raises(Stop):
        run_suite(suite, tmp_path, resume=True, only=ONLY, on_task=on_task, on_warning=warnings.append)
    assert started == [("on-device", 0)]
    assert warnings == [f"{results}:1: skipped a torn last line (an interrupted write)"]
    assert results.read_bytes() == b"" and read_records(results) == []
