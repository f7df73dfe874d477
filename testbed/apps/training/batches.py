"""Micro-batches: a batch split into equal shares, the same split on the device and in ``--local``."""

from __future__ import annotations

import torch


def micro_batches(x: torch.Tensor, m: int) -> list[torch.Tensor]:
    """Split ``x`` [B, ...] into ``m`` equal micro-batches (each one's loss is scaled by 1/m)."""
    if m < 1 or x.shape[0] % m:
        raise ValueError(f"a batch of {x.shape[0]} does not split into {m} equal micro-batches")
    return [p.contiguous() for p in torch.chunk(x, m)]
