"""Several devices on one chain (SFL with FedAvg of the devices' adapters, PSL without) equal the
one-process reference with one device model per client."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from testbed.apps.training.local import SHIPPED_TEXT, client_data, run_local_clients, take_batches
from testbed.apps.training.lora import LoraSpec
from tests.apps.training.threads import split_run_clients

N_LAYERS = 4
LR = 2e-2


@pytest.fixture(scope="module")
def batches(tiny4: Path) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    data = client_data(tiny4, [str(SHIPPED_TEXT)], 3, 2, 8)  # one text split among 3 clients: non-IID parts
    return [take_batches(cd.train, 3, 2, 8, seed=2, stream=c) for c, cd in enumerate(data)]


@pytest.mark.parametrize(("scheme_k", "cuts", "micro", "schedule"), [
    (1, [1], 1, "gpipe"), (2, [1, 2], 2, "1f1b"), (0, [2], 2, "gpipe"), (0, [1, 3], 1, "1f1b"),
])
def test_clients_equal_local(tiny4: Path, batches, scheme_k, cuts, micro, schedule) -> None:
    ref, ref_adapters = run_local_clients(tiny4, N_LAYERS, cuts[0], batches, LoraSpec(), LR, 1, micro,
                                          aggregate_every=scheme_k)
    outs = split_run_clients(tiny4, cuts, N_LAYERS, batches, micro_batches=micro, schedule=schedule,
                             lr=LR, seed=1, aggregate_every=scheme_k)
    for (out, adapters), want in zip(outs, ref_adapters, strict=True):
        assert out["losses"] == pytest.approx(ref["losses"], rel=1e-6)
        assert sorted(adapters) == sorted(want)
        for name, t in want.items():
            assert float((adapters[name] - t).abs().max()) <= 1e-6 * float(t.abs().max()), name
    dev = next(n for n in ref_adapters[0] if n.startswith("model.layers.0.") and ".lora_B." in n)
    same = all(torch.equal(ref_adapters[0][dev], r[dev]) for r in ref_adapters)
    # SFL averaged the devices' adapters at the last step (3 steps, K = 1); PSL and K = 2 leave them apart
    assert same == (scheme_k == 1)
    if scheme_k:
        assert outs[0][0]["bytes_up_per_step"] > outs[0][0]["per_hop"][1]["bytes_up_per_step"] / 3


@pytest.mark.parametrize(("cuts", "micro", "schedule"), [([1], 2, "1f1b"), ([1, 3], 1, "gpipe")])
def test_turns_hand_the_adapters_on(tiny4: Path, batches, cuts, micro, schedule) -> None:
    """sl with several devices: step s is device s % C's, starting from the adapters of step s - 1."""
    turns = [batches[0][:2], batches[1][:1]]  # 3 steps: device 0, device 1, device 0 again
    ref, ref_adapters = run_local_clients(tiny4, N_LAYERS, cuts[0], turns, LoraSpec(), LR, 1, micro,
                                          turns=True)
    outs = split_run_clients(tiny4, cuts, N_LAYERS, turns, micro_batches=micro, schedule=schedule, lr=LR,
                             seed=1, turns=True)
    assert len(ref["losses"]) == 3
    last, adapters = outs[0]  # device 0 trained last: its record has every step's loss
    assert last["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    assert last["steps"] == [0, 2] and outs[1][0]["steps"] == [1]
    for name, t in ref_adapters[0].items():
        assert float((adapters[name] - t).abs().max()) <= 1e-6 * float(t.abs().max()), name
    # device 1 ended after step 1, device 0 went on from there
    dev = next(n for n in ref_adapters[0] if n.startswith("model.layers.0.") and ".lora_B." in n)
    assert not torch.equal(outs[1][1][dev], adapters[dev])
    assert torch.equal(outs[1][1][dev], ref_adapters[1][dev]) or \
        float((outs[1][1][dev] - ref_adapters[1][dev]).abs().max()) <= 1e-6
