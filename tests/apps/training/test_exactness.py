"""Split training equals the one-process reference: same losses, same adapters (fp32 on the wire)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from testbed.apps.training.local import SHIPPED_TEXT, run_local, train_batches
from testbed.apps.training.lora import LoraSpec
from tests.apps.training.threads import split_run

N_LAYERS = 4
LR = 2e-2  # large, so that three steps move the adapters far from their start


@pytest.fixture(scope="module")
def batches(tiny4: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return train_batches(tiny4, [str(SHIPPED_TEXT)], steps=3, batch=4, seq=8, seed=5)


@pytest.fixture(scope="module")
def reference(tiny4: Path, batches) -> dict[int, tuple[dict, dict[str, torch.Tensor]]]:
    return {m: run_local(tiny4, N_LAYERS, batches, LoraSpec(), LR, 1, m) for m in (1, 2, 4)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize(("cuts", "micro", "schedule"), [
    ([1], 1, "gpipe"), ([3], 2, "1f1b"), ([1, 2], 2, "gpipe"), ([1, 3], 4, "1f1b"),
    ([1, 2, 3], 4, "gpipe"), ([1, 2, 3], 2, "1f1b"),
])
def test_split_equals_local(tiny4: Path, batches, reference, cuts, micro, schedule) -> None:
    ref, ref_adapters = reference[micro]
    out, adapters = split_run(tiny4, cuts, N_LAYERS, batches, micro_batches=micro, schedule=schedule,
                              lr=LR, seed=1)
    assert len(out["losses"]) == 3
    for a, b in zip(out["losses"], ref["losses"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b)
    assert sorted(adapters) == sorted(ref_adapters)
    moved = max(float(t.abs().max()) for n, t in ref_adapters.items() if ".lora_B." in n)
    assert moved > 1e-3  # the adapters were trained, so equal weights mean equal updates
    for name, t in ref_adapters.items():
        assert _rel(adapters[name], t) <= 1e-6, name


@pytest.mark.parametrize(("trainable", "schedule"), [([3], "gpipe"), ([0, 3], "1f1b"), ([2], "1f1b")])
def test_frozen_layers_equal_local(tiny4: Path, batches, trainable, schedule) -> None:
    """Freezing: a device without adapters gets no gradient; the chain still equals the reference."""
    ref, ref_adapters = run_local(tiny4, N_LAYERS, batches[:2], LoraSpec(), LR, 1, 2, set(trainable))
    out, adapters = split_run(tiny4, [1, 2], N_LAYERS, batches[:2], micro_batches=2, schedule=schedule,
                              lr=LR, seed=1, trainable=trainable)
    assert out["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    assert sorted(adapters) == sorted(ref_adapters)
    assert {int(n.split(".")[2]) for n in adapters} == set(trainable)
    for name, t in ref_adapters.items():
        assert _rel(adapters[name], t) <= 1e-6, name
    hop1 = out["per_hop"][1]
    if 0 in trainable:
        assert hop1["bytes_down_per_step"] > 0
    else:  # nothing to train on the device: no gradient goes up to it, its step waits for the chain
        assert hop1["bytes_down_per_step"] == 0 and out["bytes_down_per_step"] == 0
        assert out["per_hop"][0]["peak_act_bytes"] == 0


def test_micro_batching_changes_nothing_but_rounding(reference) -> None:
    """M micro-batches of 1/M-scaled losses are the same step as one batch (to float rounding)."""
    one, four = reference[1][0]["losses"], reference[4][0]["losses"]
    assert one == pytest.approx(four, rel=1e-4)  # AdamW carries the rounding into later steps


def test_lossy_codecs_cut_bytes_and_stay_close(tiny4: Path, batches, reference) -> None:
    fp32, _ = split_run(tiny4, [2], N_LAYERS, batches[:2], lr=LR, seed=1)
    int8, _ = split_run(tiny4, [2], N_LAYERS, batches[:2], lr=LR, seed=1, codec="int8", grad_codec="int8")
    # hidden size 64: headers, int8 scales and fp16 outliers weigh more than at SmolLM2's 576; labels
    # travel at full size
    assert fp32["bytes_up_per_step"] / int8["bytes_up_per_step"] > 2.3
    assert fp32["bytes_down_per_step"] / int8["bytes_down_per_step"] > 2.8
    assert int8["losses"][0] == pytest.approx(fp32["losses"][0], rel=1e-2)
    assert int8["losses"] != fp32["losses"]  # the codec really ran
