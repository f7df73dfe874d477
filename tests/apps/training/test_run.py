"""``testbed train`` end to end: node programs through the launcher across a shaped topology, the
record it prints, the adapters it saves, and the one-process reference it must equal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.apps.training.run import TrainOptions, expand_clients, merge_clients, run_training
from testbed.spec.errors import SpecError

REPO = Path(__file__).resolve().parents[3]
TOPO = REPO / "topologies" / "device-edge-cloud.yaml"
FIELDS = ("scheme", "schedule", "micro_batches", "clients", "losses", "step_ms_mean", "step_ms_p50",
          "tokens_per_s", "bytes_up_per_step", "bytes_down_per_step", "bytes_up", "bytes_down", "per_hop",
          "predicted_step_ms", "adapter_dir", "eval_ppl_before", "eval_ppl_after")


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed", "train", *args], text=True, cwd=REPO,
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize(("args", "expected"), [
    (["--placement", "phone=0:1,mec=1:4", "--batch", "3", "--micro-batches", "2"],
     "train: --micro-batches: must divide --batch (3) (got 2)"),
    (["--placement", "phone=0:1,mec=1:4", "--schedule", "zigzag"],
     "train: --schedule: must be one of gpipe, 1f1b (got 'zigzag')"),
    (["--placement", "phone=0:1,mec=1:4", "--codec", "int3"],
     "train: --codec: must be one of fp32, fp16, bf16, int8 (got 'int3')"),
    (["--placement", "phone=0:1", "--local"],
     "--placement: phone=0:1: split training needs the device and at least one stage server"),
    (["--placement", "phone=0:1,mec=2:4"], "--placement: mec: starts at layer 2 but phone ends at 1"),
])
def test_bad_input_is_one_line(tiny4: Path, args: list[str], expected: str, capsys) -> None:
    from testbed.cli import main

    assert main(["train", str(TOPO), "--model", str(tiny4), *args]) == 2
    assert capsys.readouterr().err.strip() == expected


def test_placement_checks_the_topology(tiny4: Path, tmp_path: Path) -> None:
    from testbed.spec.topology import load_topology

    with pytest.raises(SpecError, match="no such node"):
        run_training(load_topology(TOPO), "phone=0:1,edge9=1:4", TrainOptions(steps=1), model=tiny4,
                     out=tmp_path)


def test_clients_from_a_pattern_or_a_list() -> None:
    from testbed.spec.topology import load_topology

    cell = load_topology(REPO / "topologies" / "cell-4.yaml")
    assert expand_clients("dev*=0:4,mec=4:30", [], cell) == (["dev1", "dev2", "dev3", "dev4"],
                                                              "dev1=0:4,mec=4:30")
    assert expand_clients("dev*=0:4,mec=4:30", ["dev3", "dev2"], cell) == (["dev3", "dev2"],
                                                                           "dev3=0:4,mec=4:30")
    assert expand_clients("phone=0:4,mec=4:30", [], cell) == ([], "phone=0:4,mec=4:30")
    with pytest.raises(SpecError, match="matches no device"):
        expand_clients("cam*=0:4,mec=4:30", [], cell)


def test_every_client_is_checked(tiny4: Path, tmp_path: Path) -> None:
    from testbed.spec.topology import load_topology

    cell = load_topology(REPO / "topologies" / "cell-4.yaml")
    with pytest.raises(SpecError, match="no such node"):  # every device is checked against the topology
        run_training(cell, "dev1=0:1,mec=1:4", TrainOptions(steps=1, scheme="psl", clients=["dev1", "dev9"]),
                     model=tiny4, out=tmp_path)


def test_merge_clients_sums_bytes_and_waits_for_the_slowest() -> None:
    def one(step_ms, up, node):
        return {"losses": [1.0, 0.5], "step_ms": step_ms, "step_ms_mean": sum(step_ms) / 2, "bytes_up": up,
                "bytes_down": [5, 5], "bytes_up_per_step": sum(up) / 2, "bytes_down_per_step": 5.0,
                "tokens_per_s": 1000.0, "per_hop": [{"layers": "0:1", "node": node}], "adapter_dir": node}

    merged = merge_clients([one([10.0, 30.0], [100, 100], "a"), one([20.0, 10.0], [50, 70], "b")], ["a", "b"])
    assert merged["step_ms"] == [20.0, 30.0] and merged["bytes_up"] == [150, 170]
    assert merged["bytes_down_per_step"] == 10.0 and merged["losses"] == [1.0, 0.5]
    assert [c["node"] for c in merged["per_client"]] == ["a", "b"]
    assert merged["per_client"][1]["adapter_dir"] == "b"
    # taking turns (sl): each step is one device's
    a, b = one([10.0, 30.0], [100, 100], "a"), one([20.0], [50], "b")
    a["steps"], b["steps"], b["losses"] = [0, 2], [1], [1.0, 0.5, 0.2]
    merged = merge_clients([a, b], ["a", "b"])
    assert merged["step_ms"] == [10.0, 20.0, 30.0] and merged["bytes_up"] == [100, 50, 100]
    assert merged["losses"] == [1.0, 0.5, 0.2]


@pytest.mark.root
@pytest.mark.slow
def test_train_across_topology_equals_local(tiny4: Path, tmp_path: Path) -> None:
    common = ["--model", str(tiny4), "--steps", "2", "--batch", "2", "--seq", "8", "--micro-batches", "2",
              "--schedule", "1f1b", "--lr", "0.02", "--seed", "4", "--json"]
    r = _cli(str(TOPO), "--placement", "phone=0:1,mec=1:2,cloud=2:4", "--out", str(tmp_path / "split"),
             *common)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert all(k in res for k in FIELDS), set(FIELDS) - set(res)
    ref = run_training(None, "phone=0:1,mec=1:2,cloud=2:4",
                       TrainOptions(steps=2, batch=2, seq=8, micro_batches=2, schedule="1f1b", lr=0.02,
                                    seed=4), model=tiny4, local=True, out=tmp_path / "local")
    assert res["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    assert (res["scheme"], res["schedule"], res["micro_batches"], res["clients"]) == ("sl", "1f1b", 2,
                                                                                      ["phone"])
    assert res["network"].startswith("emulated")
    assert [h["node"] for h in res["per_hop"]] == ["phone", "mec", "cloud"]
    for hop in res["per_hop"][1:]:
        # [2 labels + 2 activation messages of 1 x 8 x 64 fp32] up; 2 gradients down
        assert hop["bytes_up_per_step"] > 2 * 8 * 64 * 4 and hop["bytes_down_per_step"] > 2 * 8 * 64 * 4
        assert hop["transfer_up_ms"] >= 2 * 10  # two messages, each across links of >= 15 ms delay
        assert hop["peak_act_bytes"] > 0 and hop["fwd_ms"] > 0 and hop["bwd_ms"] > 0
    assert res["bytes_up"] == [res["per_hop"][1]["bytes_up_per_step"]] * 2
    assert res["step_ms_mean"] > 4 * 15  # four one-way crossings of the 15 ms access link at least
    split_dir, local_dir = Path(res["adapter_dir"]), Path(ref["adapter_dir"])
    assert json.loads((split_dir / "adapter_config.json").read_text())["r"] == 8
    from safetensors.torch import load_file

    a, b = load_file(str(split_dir / "adapter_model.safetensors")), load_file(
        str(local_dir / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in b:
        assert float((a[k] - b[k]).abs().max()) <= 1e-6 * max(1e-30, float(b[k].abs().max())), k
    assert json.loads((tmp_path / "split" / "result.json").read_text())["losses"] == res["losses"]
    # held-out perplexity of the same base model, then of equal adapters
    assert res["eval_ppl_before"] == ref["eval_ppl_before"]
    assert res["eval_ppl_after"] == pytest.approx(ref["eval_ppl_after"], rel=1e-4)
    assert res["eval_ppl_after"] != res["eval_ppl_before"]
    # the analytic model sees the links' delays: at least one crossing of the 15 + 25 ms links each
    # way (the second micro-batch follows the first down the pipeline, so its crossings overlap;
    # with fast compute on an idle machine the prediction comes near that bound, ~117 ms here)
    assert 2 * (15 + 25) * 0.9 < res["predicted_step_ms"] < 20 * res["step_ms_mean"]


@pytest.mark.slow
def test_sfl_with_one_device_sends_no_adapters(tiny4: Path, tmp_path: Path) -> None:
    """One device's FedAvg is its own adapters: sfl with one device is sl, bytes included (its
    adapters would otherwise cross to the aggregation node and back every step)."""
    runs = {}
    for scheme in ("sl", "sfl"):
        opt = TrainOptions(steps=3, batch=2, seq=8, lr=2e-2, seed=2, evaluate=False, scheme=scheme)
        runs[scheme] = run_training(None, "dev=0:2,mec=2:4", opt, model=tiny4, loopback=True,
                                    out=tmp_path / scheme)
    assert runs["sfl"]["losses"] == pytest.approx(runs["sl"]["losses"], rel=1e-6)
    assert runs["sfl"]["bytes_up"] == runs["sl"]["bytes_up"]
    assert runs["sfl"]["bytes_down"] == runs["sl"]["bytes_down"]
    two = TrainOptions(scheme="sfl", clients=["a", "b"], aggregate_every=3)
    assert (two.averaging_every, TrainOptions(scheme="sfl").averaging_every,
            TrainOptions(scheme="psl", clients=["a", "b"]).averaging_every) == (3, 0, 0)
