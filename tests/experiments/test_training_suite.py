"""Training suites: the shipped ones load and expand; a tiny split-training suite runs end to end
over real namespaces and shaped links (tiny model, 2 steps) and its record holds the run's figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed.experiments.points import expand
from testbed.experiments.results import read_records
from testbed.spec.errors import SpecError
from testbed.spec.suite import load_suite

REPO = Path(__file__).resolve().parents[2]
TRAINING = ("split-training", "multihop-training", "sfl-clients")


@pytest.mark.parametrize("name", TRAINING)
def test_training_suites_expand(name):
    suite = load_suite(REPO / "experiments" / f"{name}.yaml")
    assert suite.workload.kind == "training" and not suite.baselines
    points = expand(suite, 30)
    assert points and all(p.kind == "split" for p in points)
    for p in points:
        assert p.params["batch"] % p.params["micro_batches"] == 0
        assert "prompt" not in p.params and "kv_cache" not in p.params


def test_multihop_suite_has_one_to_four_hops():
    suite = load_suite(REPO / "experiments/multihop-training.yaml")
    hops = {len(p.placement.split(",")) - 1 for p in expand(suite, 30)}
    assert hops == {1, 2, 3, 4}
    assert suite.params["links.edge1-edge2.up.bw_mbit"] == 400


@pytest.mark.parametrize("sets,field,message", [
    (["params.kv_cache=true"], "params.kv_cache", "not a parameter of a training workload"),
    (["sweep.micro_batches=[3]"], "sweep.micro_batches", "must divide workload.batch (4)"),
    (["sweep.schedule=[zigzag]"], "sweep.schedule[0]", "must be one of"),
    (["baselines=[on-device]"], "baselines", "compares its placements only"),
    (["workload.steps=0"], "workload.steps", ">= 1"),
])
def test_bad_training_suite_values(sets, field, message):
    with pytest.raises(SpecError) as e:
        load_suite(REPO / "experiments/split-training.yaml", sets)
    assert e.value.field == field and message in e.value.message


def test_training_param_refused_in_inference_suite():
    with pytest.raises(SpecError) as e:
        load_suite(REPO / "experiments/quick.yaml", ["params.schedule=1f1b"])
    assert e.value.field == "params.schedule" and "inference" in e.value.message


@pytest.mark.root
@pytest.mark.slow
def test_tiny_split_training_suite_runs(tmp_path):
    text = tmp_path / "text.txt"  # a short real text keeps tokenizing and evaluation quick
    text.write_text(Path("/usr/share/common-licenses/GPL-3").read_text()[:6000])
    out = tmp_path / "out"
    sets = ["model=tiny", "sweep.cut=[1]", "sweep.freeze_client=[0]", "sweep.uplink_mbit=[50]",
            "workload.steps=2", f"workload.data=[{text}]", "repeats=1"]
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "testbed", "run", "experiments/split-training.yaml",
                           "--out", str(out), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = read_records(out / "results.jsonl")
    assert rec["status"] == "ok", rec.get("error")
    assert rec["point"] == "split/cut=1,freeze_client=0,uplink_mbit=50"
    assert rec["config"]["workload"] == "training"
    t, m = rec["training"], rec["metrics"]
    assert len(t["losses"]) == 2 and all(x > 0 for x in t["losses"])
    assert t["placement"] == "phone=0:1,mec=1:2" and t["hops"] == 1 and t["scheme"] == "sl"
    # fp32 activations downstream: batch x seq x hidden x 4 bytes and a small header, per step
    assert 4 * 64 * 64 * 4 <= m["bytes_up_per_step"] < 4 * 64 * 64 * 4 * 1.1
    assert m["bytes_down_per_step"] > 0  # the activation gradients come back
    assert t["wall_ms"][-1] == pytest.approx(sum(t["step_ms"]), rel=1e-3)
    assert t["bytes_total"][-1] == sum(t["bytes_up"]) + sum(t["bytes_down"])
    assert m["predicted_step_ms"] > 0 and m["step_ms_mean"] > 0
    assert m["eval_ppl_before"] > 1 and m["eval_ppl_after"] > 1
    assert [h["node"] for h in t["per_hop"]] == ["phone", "mec"]
    assert (Path(t["adapter_dir"]) / "adapter_model.safetensors").is_file()
    assert rec["topology"]["links"] and rec["phases"]["workload_s"] > 0
