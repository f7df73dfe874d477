"""Repeats: 3 unless a suite says otherwise; every shipped suite but the smoke test runs at least 3."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testbed.spec.suite import load_suite

REPO = Path(__file__).resolve().parents[2]
SUITES = sorted((REPO / "experiments").glob("*.yaml"))


def test_default_is_three(tmp_path):
    data = yaml.safe_load((REPO / "experiments/quick.yaml").read_text())
    data.pop("repeats")
    data["topology"] = str(REPO / "topologies/device-edge-cloud.yaml")
    data["workload"]["prompts"] = str(REPO / "experiments/prompts/short.yaml")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_suite(path).repeats == 3
    assert load_suite(path, ["repeats=1"]).repeats == 1


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.stem)
def test_shipped_suites_repeat(path):
    suite = load_suite(path)
    if path.stem == "quick":  # the smoke test runs once, and says why next to the value
        assert suite.repeats == 1
        text = path.read_text()
        note = text[: text.index("\nrepeats:")].rsplit("\n", 3)
        assert "smoke test" in " ".join(note) and "default is 3" in " ".join(note)
    else:
        assert suite.repeats >= 3
