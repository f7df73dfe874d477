"""Training suites: the shipped ones load and expand; a tiny split-training suite runs end to end
over real namespaces and shaped links (tiny model, 2 steps) and its record holds the run's figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.experiments.points import expand
from testbed.experiments.results import read_records
from testbed.experiments.runner import run_suite
from testbed.report.data import load_rows
from testbed.report.training import write_summary
from testbed.spec.errors import SpecError
from testbed.spec.suite import load_suite
from tests.spec.bad_texts import bad_text

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
    assert suite.workload.evaluate is False  # every point trains alike: no perplexity 24 times


@pytest.mark.parametrize("sets,field,message", [
    (["params.kv_cache=true"], "params.kv_cache", "not a parameter of a training workload"),
    (["sweep.micro_batches=[3]"], "sweep.micro_batches", "must divide workload.batch (4)"),
    (["sweep.schedule=[zigzag]"], "sweep.schedule[0]", "must be one of"),
    (["baselines=[on-device]"], "baselines", "compares its placements only"),
    (["workload.steps=0"], "workload.steps", ">= 1"),
    (["workload.evaluate=sometimes"], "workload.evaluate", "must be true or false (got 'sometimes')"),
])
def test_bad_training_suite_values(sets, field, message):
    with pytest.raises(SpecError) as e:
        load_suite(REPO / "experiments/split-training.yaml", sets)
    assert e.value.field == field and message in e.value.message


def test_training_param_refused_in_inference_suite():
    with pytest.raises(SpecError) as e:
        load_suite(REPO / "experiments/quick.yaml", ["params.schedule=1f1b"])
    assert e.value.field == "params.schedule" and "inference" in e.value.message


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such file (got '"), ("directory", "is a directory, not a text file"),
    ("empty", "holds no text (empty)"), ("latin1", "not UTF-8 text: byte 0xe9 at offset 3"),
    ("unreadable", "cannot read the file: Input/output error"), ("nul", "without NUL bytes"),
    ("corpus", "no such file or built-in corpus"),
])
def test_bad_training_data_is_one_line_before_anything_runs(tmp_path, kind, message):
    bad = bad_text(tmp_path, kind)
    suite = tmp_path / "suite.yaml"
    text = (REPO / "experiments/split-training.yaml").read_text()
    text = text.replace("../topologies", str(REPO / "topologies"))
    suite.write_text(text.replace("  devices: 1\n", f"  devices: 1\n  data: [{json.dumps(bad)}]\n"))
    with pytest.raises(SpecError) as e:
        load_suite(suite)
    assert (e.value.file, e.value.field) == (str(suite), "workload.data[0]") and message in e.value.message
    with pytest.raises(SpecError) as e:  # the same through --set, which names itself
        load_suite(REPO / "experiments/split-training.yaml", [f"workload.data=[{json.dumps(bad)}]"])
    assert (e.value.file, e.value.field) == ("--set", "workload.data[0]") and message in e.value.message


def test_training_data_count_fits_every_device_count(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("Some words.\n")
    with pytest.raises(SpecError) as e:  # sfl-clients sweeps 1, 2 and 4 devices: one file or none
        load_suite(REPO / "experiments/sfl-clients.yaml", [f"workload.data=[{a}, {a}]"])
    assert e.value.field == "workload.data"
    assert "2 files for 1 device: give one file (split among the devices) or one per device" \
        in e.value.message
    assert "(sweep.devices[0] is 1)" in e.value.message
    one = load_suite(REPO / "experiments/sfl-clients.yaml", [f"workload.data=[{a}]"])
    assert one.workload.data == [str(a)]


@pytest.mark.slow
def test_text_too_short_for_a_batch_stops_the_run_before_it_starts(tmp_path):
    """Too short for one batch needs the tokenizer: the runner checks every device count's texts after
    preparing the model and before any point (no results file, no network)."""
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here, far fewer than one batch of 4 x 65 tokens.\n")
    suite = load_suite(REPO / "experiments/split-training.yaml",
                       ["model=tiny", f"workload.data=[{short}]", "sweep.cut=[1]"])
    with pytest.raises(SpecError) as e:
        run_suite(suite, tmp_path / "out")
    assert (e.value.file, e.value.field) == (str(suite.source), "workload.data[0]")
    assert e.value.message.startswith("too short for one batch of 4 x 65 tokens")
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.parametrize("sets,field,message", [
    (["params.head_on_device=maybe"], "params.head_on_device", "must be true or false (got 'maybe')"),
    (["sweep.head_on_device=[false, 1]"], "sweep.head_on_device[1]", "must be true or false (got 1)"),
    (["placements={u: {params: {head_on_device: true}}}"], "placements.u.placement", "missing"),
    (["placements={u: {placement: 'phone=0:{cut},mec={cut}:{layers}', head_on_device: true}}"],
     "placements.u.head_on_device", "unknown key 'head_on_device' (expected one of placement, params)"),
    (["placements={u: {placement: 'phone=0:{cut},mec={cut}:{layers}', params: {head_on_device: U}}}"],
     "placements.u.params.head_on_device", "must be true or false (got 'U')"),
    (["placements={u: {placement: 'phone=0:{cut},mec={cut}:{layers}', params: {micro_batches: 3}}}"],
     "placements.u.params.micro_batches", "must divide workload.batch (4)"),
    (["placements={u: {placement: 'phone=0:{cut},mec={cut}:{layers}', params: {quant: int8}}}"],
     "placements.u.params.quant", "not a parameter of a training workload"),
])
def test_bad_head_on_device_values(sets, field, message):
    with pytest.raises(SpecError) as e:
        load_suite(REPO / "experiments/split-training.yaml", sets)
    assert e.value.field == field and message in e.value.message, str(e.value)


def test_head_on_device_refused_in_inference_suite():
    with pytest.raises(SpecError) as e:
        load_suite(REPO / "experiments/quick.yaml", ["params.head_on_device=true"])
    assert e.value.field == "params.head_on_device" and "not a parameter of a inference" in e.value.message


def test_u_shape_points_sit_beside_the_plain_split():
    """The shipped suite's ushape placement pins its own values: one point per cut, at the plain split's
    10 Mbit/s unfrozen point; sweeping head_on_device instead doubles every point."""
    suite = load_suite(REPO / "experiments/split-training.yaml")
    points = {p.id: p for p in expand(suite, 30)}
    u = {i: p for i, p in points.items() if p.placement_name == "ushape"}
    assert sorted(u) == ["ushape/cut=2,freeze_client=0,uplink_mbit=10",
                         "ushape/cut=8,freeze_client=0,uplink_mbit=10"]
    for pid, p in u.items():
        plain = points[pid.replace("ushape/", "split/")]
        assert p.placement == plain.placement and p.params["head_on_device"] is True
        assert {**p.params, "head_on_device": False} == plain.params
    assert len(points) == 2 * 3 * 3 + 2
    swept = load_suite(REPO / "experiments/split-training.yaml",
                       ["placements={split: 'phone=0:{cut},mec={cut}:{layers}'}",
                        "sweep.head_on_device=[false,true]"])
    ids = [p.id for p in expand(swept, 30)]
    assert len(ids) == 2 * 3 * 3 * 2 and "split/cut=2,freeze_client=0,uplink_mbit=2,head_on_device=on" in ids


@pytest.mark.root
@pytest.mark.slow
def test_tiny_split_training_suite_runs(tmp_path):
    """The shipped suite's plain split and its U-shaped point at the same cut, end to end: with fp32 on
    the wire the two placements train the same (equal losses); the U-shape's extra crossing (the last
    server's output up, the head's gradient down) shows in its bytes and its record says so."""
    text = tmp_path / "text.txt"  # a short real text keeps tokenizing and evaluation quick
    text.write_text(Path("/usr/share/common-licenses/GPL-3").read_text()[:6000])
    out = tmp_path / "out"
    sets = ["model=tiny", "sweep.cut=[1]", "sweep.freeze_client=[0]", "sweep.uplink_mbit=[10]",
            "workload.steps=2", f"workload.data=[{text}]", "repeats=1"]
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "testbed", "run", "experiments/split-training.yaml",
                           "--out", str(out), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["placement_name"]: r for r in read_records(out / "results.jsonl")}
    assert set(recs) == {"split", "ushape"}
    assert all(r["status"] == "ok" for r in recs.values()), [r.get("error") for r in recs.values()]
    rec = recs["split"]
    assert rec["point"] == "split/cut=1,freeze_client=0,uplink_mbit=10"
    assert rec["config"]["workload"] == "training"
    t, m = rec["training"], rec["metrics"]
    assert len(t["losses"]) == 2 and all(x > 0 for x in t["losses"])
    assert t["placement"] == "phone=0:1,mec=1:2" and t["hops"] == 1 and t["scheme"] == "sl"
    assert not t["head_on_device"] and rec["params"]["head_on_device"] is False
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

    u = recs["ushape"]
    tu, mu = u["training"], u["metrics"]
    assert u["point"] == "ushape/cut=1,freeze_client=0,uplink_mbit=10"
    assert u["params"]["head_on_device"] is True
    assert tu["head_on_device"] and mu["head_on_device"] and tu["placement"] == t["placement"]
    assert tu["losses"] == pytest.approx(t["losses"], rel=1e-5)  # the same training, the head elsewhere
    assert mu["eval_ppl_before"] == m["eval_ppl_before"]  # the same base model and text
    assert mu["eval_ppl_after"] == pytest.approx(m["eval_ppl_after"], rel=1e-4)
    # each micro-batch's output (hidden size) comes back up and the head's gradient goes down
    hop = tu["per_hop"][1]
    assert min(hop["output_bytes_per_step"], hop["head_grad_bytes_per_step"]) >= 4 * 64 * 64 * 4
    assert mu["bytes_down_per_step"] - m["bytes_down_per_step"] == pytest.approx(hop["output_bytes_per_step"],
                                                                                  rel=0.01)
    # up: the head's gradient more, the labels (batch x seq int64 and a header) less: they stay on the device
    labels = hop["head_grad_bytes_per_step"] - (mu["bytes_up_per_step"] - m["bytes_up_per_step"])
    assert 4 * 64 * 8 <= labels < 4 * 64 * 8 + 512, labels
    assert tu["per_hop"][0]["head_fwd_ms"] > 0 and mu["predicted_step_ms"] > 0

    # the summary shows where the head is: the placement as run, U-shaped marked
    rows, records = load_rows(out)
    text = write_summary(out, rows, records, []).read_text()
    line = {r.placement_name: next(x for x in text.splitlines() if x.startswith(f"| {r.point} |"))
            for r in rows}
    assert "| `phone=0:1,mec=1:2 + head on phone` |" in line["ushape"]
    assert "| `phone=0:1,mec=1:2` |" in line["split"]
