"""U-shaped split training (``--head-on-device``): the device keeps the final norm, the head, the loss and
the labels; the last server's output comes back to it and the head's gradient goes down the chain.  With
fp32 on the wire it still equals the one-process reference, and no message carries a label."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from testbed.apps.training import analytic
from testbed.apps.training.local import (
    SHIPPED_TEXT,
    client_data,
    run_local,
    run_local_clients,
    take_batches,
    train_batches,
)
from testbed.apps.training.lora import LoraSpec
from testbed.apps.training.run import merge_clients
from testbed.wire.message import Kind
from tests.apps.training.threads import split_run, split_run_clients

N_LAYERS = 4
LR = 2e-2  # large, so that three steps move the adapters far from their start


@pytest.fixture(scope="module")
def batches(tiny4: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return train_batches(tiny4, [str(SHIPPED_TEXT)], steps=3, batch=4, seq=8, seed=5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _spy(monkeypatch) -> list[tuple[Kind, bytes]]:
    """Every message any node of a threaded run receives (so every one sent): kind and payload bytes."""
    from testbed.apps.training import client, server
    from testbed.wire import message

    seen: list[tuple[Kind, bytes]] = []

    def parse(frames):
        msg = message.parse(frames)
        seen.append((msg.kind, b"".join(bytes(memoryview(f).cast("B")) for f in msg.payload)))
        return msg

    monkeypatch.setattr(client, "parse", parse)
    monkeypatch.setattr(server, "parse", parse)
    return seen


def _carries_labels(seen: list[tuple[Kind, bytes]], batches, micro: int) -> bool:
    rows = [bytes(ym.contiguous().numpy().tobytes()) for _, y in batches for ym in y.chunk(micro)]
    return any(r in payload for r in rows for _, payload in seen)


@pytest.mark.parametrize(("cuts", "micro", "schedule"), [
    ([2], 2, "gpipe"), ([1, 3], 4, "1f1b"), ([1, 2, 3], 2, "gpipe"),
])
def test_ushape_equals_local(tiny4: Path, batches, cuts, micro, schedule, monkeypatch) -> None:
    ref, ref_adapters = run_local(tiny4, N_LAYERS, batches, LoraSpec(), LR, 1, micro)
    seen = _spy(monkeypatch)
    out, adapters = split_run(tiny4, cuts, N_LAYERS, batches, micro_batches=micro, schedule=schedule,
                              lr=LR, seed=1, head_on_device=True)
    assert len(out["losses"]) == 3 and out["head_on_device"]
    for a, b in zip(out["losses"], ref["losses"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b)
    assert sorted(adapters) == sorted(ref_adapters)
    assert max(float(t.abs().max()) for n, t in ref_adapters.items() if ".lora_B." in n) > 1e-3
    for name, t in ref_adapters.items():
        assert _rel(adapters[name], t) <= 1e-6, name
    # the labels never left the device: no TRAIN_LABELS, and no payload holds a micro-batch's label row
    kinds = {k for k, _ in seen}
    assert Kind.TRAIN_LABELS not in kinds and {Kind.TRAIN_OUTPUT, Kind.TRAIN_HEAD_GRAD} <= kinds
    assert not _carries_labels(seen, batches, micro)
    # every step: M outputs back over every hop and M head gradients down it, next to the usual traffic
    assert sum(k == Kind.TRAIN_OUTPUT for k, _ in seen) == 3 * micro * len(cuts)
    for hop in out["per_hop"][1:]:
        # fp32 both ways, same shapes: the outputs are half of what comes down, the head's gradients half
        # of what goes up
        assert hop["output_bytes_per_step"] == pytest.approx(hop["bytes_down_per_step"] / 2)
        assert hop["head_grad_bytes_per_step"] == pytest.approx(hop["bytes_up_per_step"] / 2)
    dev = out["per_hop"][0]
    assert dev["head_fwd_ms"] > 0 and dev["head_bwd_ms"] > 0 and dev["peak_act_bytes"] > 0
    assert out["bytes_down"][0] == out["per_hop"][1]["bytes_down_per_step"]


def test_spy_sees_labels_without_the_u(tiny4: Path, batches, monkeypatch) -> None:
    """The check above can fail: with the head on the last server the labels do cross, and the U-shaped
    run moves twice the bytes down (outputs next to the gradients) that this one does."""
    seen = _spy(monkeypatch)
    plain, _ = split_run(tiny4, [2], N_LAYERS, batches[:1], micro_batches=2, lr=LR, seed=1)
    assert _carries_labels(seen, batches[:1], 2)
    u, _ = split_run(tiny4, [2], N_LAYERS, batches[:1], micro_batches=2, lr=LR, seed=1, head_on_device=True)
    assert u["bytes_down_per_step"] == 2 * plain["bytes_down_per_step"]
    assert u["losses"] == pytest.approx(plain["losses"], rel=1e-6)


def test_ushape_frozen_device(tiny4: Path, batches) -> None:
    """A device without adapters gets no gradient of its own output but still computes the loss."""
    ref, ref_adapters = run_local(tiny4, N_LAYERS, batches[:2], LoraSpec(), LR, 1, 2, {2, 3})
    out, adapters = split_run(tiny4, [1, 2], N_LAYERS, batches[:2], micro_batches=2, schedule="1f1b",
                              lr=LR, seed=1, trainable=[2, 3], head_on_device=True)
    assert out["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    for name, t in ref_adapters.items():
        assert _rel(adapters[name], t) <= 1e-6, name
    hop1 = out["per_hop"][1]
    assert hop1["bytes_down_per_step"] == hop1["output_bytes_per_step"] > 0  # outputs only, no gradient


@pytest.mark.parametrize(("k", "cuts", "schedule"), [(1, [1, 3], "1f1b"), (0, [2], "gpipe")])
def test_ushape_clients_equal_local(tiny4: Path, k, cuts, schedule) -> None:
    """sfl (k = 1) and psl (k = 0): each device holds its head; the run's loss sums their shares."""
    data = client_data(tiny4, [str(SHIPPED_TEXT)], 2, 2, 8)
    batches = [take_batches(cd.train, 2, 2, 8, seed=2, stream=c) for c, cd in enumerate(data)]
    ref, ref_adapters = run_local_clients(tiny4, N_LAYERS, cuts[0], batches, LoraSpec(), LR, 1, 2,
                                          aggregate_every=k)
    outs = split_run_clients(tiny4, cuts, N_LAYERS, batches, micro_batches=2, schedule=schedule, lr=LR,
                             seed=1, aggregate_every=k, head_on_device=True)
    merged = merge_clients([{**o, "adapter_dir": None} for o, _ in outs], ["a", "b"])
    assert merged["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    for (_, adapters), want in zip(outs, ref_adapters, strict=True):
        for name, t in want.items():
            assert _rel(adapters[name], t) <= 1e-6, name


def test_ushape_turns_equal_local(tiny4: Path) -> None:
    """sl with two devices taking turns: each step's loss is the device's whose turn it was."""
    data = client_data(tiny4, [str(SHIPPED_TEXT)], 2, 2, 8)
    turns = [take_batches(data[0].train, 2, 2, 8, seed=2, stream=0)[:2],
             take_batches(data[1].train, 1, 2, 8, seed=2, stream=1)]
    ref, ref_adapters = run_local_clients(tiny4, N_LAYERS, 1, turns, LoraSpec(), LR, 1, 2, turns=True)
    outs = split_run_clients(tiny4, [1], N_LAYERS, turns, micro_batches=2, schedule="1f1b", lr=LR, seed=1,
                             turns=True, head_on_device=True)
    merged = merge_clients([{**o, "adapter_dir": None} for o, _ in outs], ["a", "b"])
    assert merged["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    for name, t in ref_adapters[0].items():
        assert _rel(outs[0][1][name], t) <= 1e-6, name


def test_relayed_hop_adds_up_the_links() -> None:
    hop = analytic.relayed(1000, 2000, [(8e6, 4e6, 5.0), (8e6, 8e6, 10.0)])
    assert hop.latency_ms == 15.0
    assert hop.forward_ms == pytest.approx(1000 * 8e3 / 8e6 * 2)  # 1 ms on each link
    assert hop.backward_ms == pytest.approx(2000 * 8e3 / 4e6 + 2000 * 8e3 / 8e6)
    with pytest.raises(ValueError):
        analytic.relayed(1, 1, [])


def test_prediction_counts_the_return_leg() -> None:
    """The head as one more stage behind a relayed hop: a step at least the U's four chain crossings."""
    from testbed.apps.training.placement import Stage
    from testbed.apps.training.run import TrainOptions, predict_step_ms
    from testbed.spec.topology import load_topology

    topo = load_topology(Path(__file__).resolve().parents[3] / "topologies" / "device-edge-cloud.yaml")
    stages = [Stage("phone", 0, 1), Stage("mec", 1, 2), Stage("cloud", 2, 4)]
    hop = {"fwd_ms": 1.0, "bwd_ms": 1.0, "bytes_up_per_step": 4096, "bytes_down_per_step": 4096}
    plain = [hop, hop, hop]
    u = [{**hop, "head_fwd_ms": 1.0, "head_bwd_ms": 1.0}] + [
        {**hop, "bytes_up_per_step": 8192, "bytes_down_per_step": 8192, "output_bytes_per_step": 4096,
         "head_grad_bytes_per_step": 4096}] * 2
    one_way = 15 + 25  # phone-mec and mec-cloud delays (ms)
    p_plain = predict_step_ms(plain, stages, TrainOptions(micro_batches=1), topo)
    p_u = predict_step_ms(u, stages, TrainOptions(micro_batches=1, head_on_device=True), topo)
    assert 2 * one_way <= p_plain < 3 * one_way
    assert 4 * one_way <= p_u < 5 * one_way


def test_drop_after_goes_without_the_u(tiny4: Path, capsys) -> None:
    from testbed.cli import main

    topo = Path(__file__).resolve().parents[3] / "topologies" / "device-edge-cloud.yaml"
    assert main(["train", str(topo), "--model", str(tiny4), "--placement", "phone=0:1,mec=1:4",
                 "--head-on-device", "--drop-after", "5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "train: --drop-after: goes without --head-on-device: a device left out of a round would hold its "
        "micro-batches' loss (got 5)")


@pytest.mark.root
@pytest.mark.slow
def test_ushape_across_topology_equals_local(tiny4: Path, tmp_path: Path) -> None:
    """Over the shaped links (one server, to keep it short: relays are tested above): the U's four
    crossings of the access link per step, and --local's figures."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from testbed.apps.training.run import TrainOptions, run_training

    repo = Path(__file__).resolve().parents[3]
    placement = "phone=0:2,mec=2:4"
    common = ["--model", str(tiny4), "--steps", "2", "--batch", "2", "--seq", "8", "--micro-batches", "2",
              "--schedule", "1f1b", "--lr", "0.02", "--seed", "4", "--no-eval", "--json"]
    topo = repo / "topologies" / "device-edge-cloud.yaml"
    r = subprocess.run([sys.executable, "-m", "testbed", "train", str(topo), "--placement", placement,
                        "--head-on-device", "--out", str(tmp_path / "u"), *common],
                       text=True, cwd=repo, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    opt = TrainOptions(steps=2, batch=2, seq=8, micro_batches=2, schedule="1f1b", lr=0.02, seed=4,
                       evaluate=False, head_on_device=True)
    ref = run_training(None, placement, opt, model=tiny4, local=True, out=tmp_path / "local")
    assert res["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    assert res["options"]["head_on_device"] and res["network"].startswith("emulated")
    a = load_file(str(Path(res["adapter_dir"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(ref["adapter_dir"]) / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in b:
        assert float((a[k] - b[k]).abs().max()) <= 1e-6 * max(1e-30, float(b[k].abs().max())), k
    one_way = 15  # phone-mec delay (ms)
    for hop in res["per_hop"][1:]:
        assert hop["output_bytes_per_step"] == pytest.approx(hop["bytes_down_per_step"] / 2)
        assert hop["head_grad_bytes_per_step"] == pytest.approx(hop["bytes_up_per_step"] / 2)
    # activations to the server, its output back, the head's gradient to it, the gradients back
    assert res["step_ms_mean"] > 4 * one_way * 0.9
    assert 4 * one_way * 0.9 < res["predicted_step_ms"] < 20 * res["step_ms_mean"]


def test_server_refuses_labels_in_a_u(tiny4: Path) -> None:
    """A U-shaped last server answers TRAIN_LABELS with an error and holds no head of its own."""
    import threading

    import zmq

    from testbed.apps.training.run import free_ports
    from testbed.apps.training.server import StageServer
    from testbed.apps.training.settings import StageSettings
    from testbed.apps.training.stage import TrainStage
    from testbed.wire.message import parse, train_labels

    addr = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    s = StageSettings(model=str(tiny4), start=2, end=N_LAYERS, stage=1, bind=addr, head_on_device=True,
                      timeout_s=30.0)
    srv = StageServer(TrainStage(tiny4, 2, N_LAYERS, LoraSpec(), 0), s)
    assert not srv.stage.has_loss and srv.stage.shard.lm_head is None
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(addr)
        sock.send_multipart(train_labels(0, 0, 0, torch.zeros(1, 8, dtype=torch.int64)).frames())
        assert sock.poll(20_000)
        reply = parse(sock.recv_multipart())
        assert reply.kind == Kind.ERROR and "labels stay on the device" in reply.text()
    finally:
        sock.close(0)
        srv.running = False
        t.join(5)
        srv.close()
