"""U-shaped split training (``--head-on-device``): the device keeps the head, the loss and the labels;
with fp32 on the wire it still equals the one-process reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from testbed.apps.training.local import SHIPPED_TEXT, run_local, train_batches
from testbed.apps.training.lora import LoraSpec
from tests.apps.training.threads import split_run

N_LAYERS = 4
LR = 2e-2


@pytest.fixture(scope="module")
def batches(tiny4: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return train_batches(tiny4, [str(SHIPPED_TEXT)], steps=3, batch=4, seq=8, seed=5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize(("cuts", "micro", "schedule"), [([2], 2, "gpipe"), ([1, 3], 4, "1f1b")])
def test_ushape_equals_local(tiny4: Path, batches, cuts, micro, schedule) -> None:
    ref, ref_adapters = run_local(tiny4, N_LAYERS, batches, LoraSpec(), LR, 1, micro)
    out, adapters = split_run(tiny4, cuts, N_LAYERS, batches, micro_batches=micro, schedule=schedule,
                              lr=LR, seed=1, head_on_device=True)
    print(out["losses"], ref["losses"])
    for a, b in zip(out["losses"], ref["losses"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b)
    for name, t in ref_adapters.items():
        assert _rel(adapters[name], t) <= 1e-6, name
