"""FedAvg and the plain mean of adapter state dicts: exact figures, identities, refused mismatches."""

from __future__ import annotations

import pytest
import torch

from testbed.apps.training.aggregate import STRATEGIES, FedAvg, Mean, Strategy, average, fedavg


def state(a: float, b: float) -> dict[str, torch.Tensor]:
    return {"layers.0.q_proj.lora_A.weight": torch.full((2, 3), a),
            "layers.0.q_proj.lora_B.weight": torch.full((3, 2), b)}


def test_weighted_by_samples_exactly() -> None:
    out = FedAvg().aggregate([(state(0.0, 8.0), 1), (state(4.0, 0.0), 3)])
    assert torch.equal(out["layers.0.q_proj.lora_A.weight"], torch.full((2, 3), 3.0))  # (0*1 + 4*3) / 4
    assert torch.equal(out["layers.0.q_proj.lora_B.weight"], torch.full((3, 2), 2.0))  # (8*1 + 0*3) / 4
    mean = Mean().aggregate([(state(0.0, 8.0), 1), (state(4.0, 0.0), 3)])
    assert torch.equal(mean["layers.0.q_proj.lora_A.weight"], torch.full((2, 3), 2.0))
    assert torch.equal(mean["layers.0.q_proj.lora_B.weight"], torch.full((3, 2), 4.0))
    assert set(STRATEGIES) == {"fedavg", "mean"} and all(STRATEGIES[n]().name == n for n in STRATEGIES)
    s: Strategy = FedAvg()  # the protocol: one method
    assert callable(s.aggregate)


def test_identities_are_bit_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x = {"a": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g).to(torch.bfloat16)}
    one = fedavg([x], [7])
    assert all(torch.equal(one[k], x[k]) and one[k].dtype == x[k].dtype for k in x)
    same = fedavg([x, x, x], [1, 5, 2])
    assert all(torch.equal(same[k], x[k]) for k in x)
    assert all(torch.equal(average([x, x])[k], x[k]) for k in x)
    # a client with no samples this round does not count
    y = {k: v * 3 for k, v in x.items()}
    assert all(torch.equal(fedavg([x, y], [4, 0])[k], x[k]) for k in x)


def test_matches_float64_reference_and_order_is_fixed() -> None:
    g = torch.Generator().manual_seed(1)
    xs = [{"w": torch.randn(5, 5, generator=g)} for _ in range(4)]
    n = [10, 3, 7, 1]
    ref = sum(ni * x["w"].double() for ni, x in zip(n, xs, strict=True)) / sum(n)
    out = fedavg(xs, n)["w"]
    assert out.dtype == torch.float32 and torch.equal(out, ref.float())
    assert torch.equal(fedavg(xs, n)["w"], out)  # run twice: the same bits


def test_mismatches_are_refused() -> None:
    with pytest.raises(ValueError, match="no client states"):
        fedavg([], [])
    with pytest.raises(ValueError, match="2 states but 1 weights"):
        fedavg([state(1, 1), state(2, 2)], [1])
    with pytest.raises(ValueError, match="positive sum"):
        fedavg([state(1, 1)], [0])
    with pytest.raises(ValueError, match="positive sum"):
        fedavg([state(1, 1), state(1, 1)], [1, float("nan")])
    with pytest.raises(ValueError, match="keys differ"):
        fedavg([state(1, 1), {"other": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        fedavg([{"w": torch.zeros(2, 3)}, {"w": torch.zeros(2, 2)}], [1, 1])
    with pytest.raises(ValueError, match="floating-point"):
        fedavg([{"w": torch.zeros(2, dtype=torch.long)}], [1])
