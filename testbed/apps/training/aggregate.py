"""Aggregating client-side LoRA adapters in split federated learning: FedAvg and a plain mean.

A strategy has one method, ``aggregate(results)``, taking ``(state_dict, num_samples)`` per client and
returning the new global state dict (the shape of Flower's ``Strategy.aggregate_fit``, reduced to what
SFL needs: the adapter tensors, no parameters server).  :class:`FedAvg` weights each client by the samples
it trained on since the last round (McMahan et al., 2017); :class:`Mean` weights every client the same.

Exactness: the sum ``sum_i n_i * x_i`` is taken in float64 in the clients' order and divided once, then
cast back to each tensor's dtype.  So one client gives back its own tensors bit for bit, equal tensors
give back that tensor, and the result does not depend on anything but the inputs and their order.

Public API: :class:`Strategy`, :class:`FedAvg`, :class:`Mean`, :data:`STRATEGIES`, :func:`fedavg`,
:func:`average`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

StateDict = Mapping[str, torch.Tensor]


def fedavg(states: Sequence[StateDict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_i w_i * state_i / sum_i w_i`` for every key; the states must share keys, shapes and dtypes."""
    if not states:
        raise ValueError("nothing to aggregate: no client states")
    if len(weights) != len(states):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:  # `not >=` also refuses NaN
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(keys):
            diff = sorted(set(s) ^ set(keys))
            raise ValueError(f"client {i}'s adapter keys differ from client 0's: {diff[:4]}")
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        ref = states[0][k]
        if not ref.is_floating_point():
            raise ValueError(f"{k}: only floating-point tensors can be averaged, got {ref.dtype}")
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for i, s in enumerate(states):
            t = s[k]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(f"{k}: client {i} has {tuple(t.shape)} {t.dtype}, client 0 "
                                 f"{tuple(ref.shape)} {ref.dtype}")
            acc += float(weights[i]) * t.detach().to("cpu", torch.float64)
        out[k] = (acc / total).to(ref.dtype)
    return out


def average(states: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """The plain mean of the states (every client weighs the same)."""
    return fedavg(states, [1.0] * len(states))


class Strategy(Protocol):
    """How the aggregation node combines the clients' adapters after a round."""

    def aggregate(self, results: Sequence[tuple[StateDict, int]]) -> dict[str, torch.Tensor]:
        """``results``: (adapter state dict, samples trained this round) per client, in a fixed order."""
        ...


class FedAvg:
    """Weighted by samples: a client that trained on more windows this round counts more."""

    name = "fedavg"

    def aggregate(self, results: Sequence[tuple[StateDict, int]]) -> dict[str, torch.Tensor]:
        return fedavg([s for s, _ in results], [float(n) for _, n in results])


class Mean:
    """Every client counts the same, whatever it trained on."""

    name = "mean"

    def aggregate(self, results: Sequence[tuple[StateDict, int]]) -> dict[str, torch.Tensor]:
        return average([s for s, _ in results])


STRATEGIES: dict[str, type] = {"fedavg": FedAvg, "mean": Mean}
