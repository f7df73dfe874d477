"""Training batches: windows of a token stream, drawn in a seeded order; micro-batch splits.

Both the split run and the one-process reference draw their batches here, so the data order is
the same for a given seed.
"""

from __future__ import annotations

import torch


def draw_batches(ids: torch.Tensor, steps: int, batch: int, seq: int, seed: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of ``batch`` windows of ``seq + 1`` tokens of ``ids`` (1-D): (inputs, labels),
    labels being the inputs shifted by one token."""
    ids = ids.reshape(-1).to(torch.int64)
    if ids.numel() < seq + 2:
        raise ValueError(f"{ids.numel()} tokens of text, a window needs {seq + 1}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq - 1, (steps, batch), generator=g)
    out = []
    for row in starts:
        win = torch.stack([ids[s:s + seq + 1] for s in row.tolist()])
        out.append((win[:, :-1].contiguous(), win[:, 1:].contiguous()))
    return out


def micro_batches(x: torch.Tensor, m: int) -> list[torch.Tensor]:
    """Split ``x`` [B, ...] into ``m`` equal micro-batches (each one's loss is scaled by 1/m)."""
    if m < 1 or x.shape[0] % m:
        raise ValueError(f"a batch of {x.shape[0]} does not split into {m} equal micro-batches")
    return [p.contiguous() for p in torch.chunk(x, m)]
