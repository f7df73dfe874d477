"""The one placement grammar under each application's rules: what inference accepts, training refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.apps.inference.placement import parse_placement as infer_placement
from testbed.apps.placement import Stage
from testbed.apps.training.placement import parse_placement as train_placement
from testbed.spec.errors import SpecError
from testbed.spec.topology import load_topology

TOPO = load_topology(Path(__file__).resolve().parents[2] / "topologies" / "device-edge-cloud.yaml")


@pytest.mark.parametrize(("text", "why"), [
    ("phone=0:8,mec|cloud=8:30", "this command takes no standbys"),
    ("phone=0:0,mec=0:30", "empty layer range"),
    ("phone=0:30", "split training needs the device and at least one stage server"),
    ("phone=0:8,mec=8:30,phone=30:30", "empty layer range"),
])
def test_training_refuses_what_inference_accepts(text: str, why: str) -> None:
    with pytest.raises(SpecError) as e:
        train_placement(text, TOPO, 30)
    assert str(e.value).startswith("--placement: ") and why in str(e.value) and "\n" not in str(e.value)


def test_both_read_the_same_stages() -> None:
    text = "phone=0:8,mec=8:20,cloud=20:30"
    assert infer_placement(text, TOPO, 30) == train_placement(text, TOPO, 30) == [
        Stage("phone", 0, 8), Stage("mec", 8, 20), Stage("cloud", 20, 30)]
    assert infer_placement("phone=0:0,mec|cloud=0:30", TOPO, 30) == [
        Stage("phone", 0, 0), Stage("mec", 0, 30, ("cloud",))]


def test_a_cell_runs_nothing() -> None:
    topo = load_topology(Path(__file__).resolve().parents[2] / "topologies" / "cells-3.yaml")
    cell = next(n for n, s in topo.nodes.items() if s.role == "cell")
    for parse, what in [(infer_placement, "a shard"), (train_placement, "a stage")]:
        with pytest.raises(SpecError, match=f"a cell cannot run {what}"):
            parse(f"{cell}=0:1,x=1:2", topo)
