"""Freezing ratios (which layers of a side get a LoRA adapter) and the smashed-data store of a frozen client.

``--freeze-client R`` / ``--freeze-server R``: the fraction R of that side's transformer layers that get
no trainable adapter.  ``floor(R * n)`` layers are frozen (so at most the fraction asked for; 1.0 freezes
them all, 0.0 none), and they are the **lowest** layers of the side.  Why the lowest:

* Backward runs from the loss downwards and can stop at the lowest layer that holds an adapter.  Frozen
  layers below it need no backward at all (no activation gradients, no stored activations for them);
  frozen layers *above* an adapter would still need a full backward to carry the gradient down to it,
  so freezing the top would cost accuracy and save almost no time.
* When the client side is fully frozen, the edge needs no gradient from it and sends none, and the
  client's output for a sample never changes: the edge can keep it (:class:`SmashedStore`).
* Lower layers carry the more general features, so freezing them costs the least adaptation (the usual
  choice in layer-freezing fine-tuning; SplitLoRA's freezing ratio trades accuracy for latency the same way).

The indices returned are global layer numbers, ready for ``peft.LoraConfig(layers_to_transform=...)``.

The smashed-data store: a fully frozen client computes, for each sample, the same activations every
epoch.  It uploads them in the first epoch only; the edge keeps the decoded tensor it received per sample
id (the window index of ``data.Batches``) and reuses it afterwards.  The store counts the bytes the
uploads took and the bytes each reuse saved.

Public API: :func:`check_ratio`, :func:`frozen_count`, :func:`adapter_layers`, :class:`SmashedStore`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from testbed.spec.errors import SpecError, got


def check_ratio(value: object, flag: str) -> float:
    """``value`` as a freezing ratio from 0 to 1; anything else is a SpecError naming ``flag``."""
    try:
        r = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        r = math.nan
    if not 0.0 <= r <= 1.0:  # NaN fails too
        raise SpecError(flag, flag.lstrip("-"), f"a fraction of the layers from 0 to 1 {got(value)}")
    return r


def frozen_count(n_layers: int, ratio: float) -> int:
    """How many of ``n_layers`` layers a ratio freezes: ``floor(ratio * n)`` (1e-9 absorbs 0.29 * 100)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"freezing ratio must be from 0 to 1, got {ratio}")
    return min(n_layers, math.floor(ratio * n_layers + 1e-9))


def adapter_layers(layers: Sequence[int], ratio: float) -> list[int]:
    """The layers of one side (global indices) that get adapters: all but the lowest frozen ones.

    An empty result means the side is fully frozen: forward only, and for a client, smashed data reused.
    """
    ordered = sorted(layers)
    return ordered[frozen_count(len(ordered), ratio):]


class SmashedStore:
    """The edge's copy of a frozen client's activations, by sample id, with a byte count.

    ``put`` keeps what arrived for a batch (detached, as received: so reuse equals a fresh upload bit for
    bit) and the wire bytes its upload took, shared out among its samples; ``get`` gives the samples
    back stacked and adds what their uploads took to ``bytes_saved``.
    """

    def __init__(self) -> None:
        self._acts: dict[int, torch.Tensor] = {}
        self._wire: dict[int, int] = {}
        self.bytes_uploaded = 0  # wire bytes of the first-epoch uploads
        self.bytes_saved = 0  # wire bytes that reuse did not send
        self.reused = 0  # samples served from the store

    def __contains__(self, sample_id: int) -> bool:
        return sample_id in self._acts

    def __len__(self) -> int:
        return len(self._acts)

    @property
    def bytes_held(self) -> int:
        """Memory the kept activations take at the edge."""
        return sum(t.numel() * t.element_size() for t in self._acts.values())

    def missing(self, sample_ids: Sequence[int]) -> list[int]:
        return [s for s in sample_ids if s not in self._acts]

    def put(self, sample_ids: Sequence[int], activations: torch.Tensor,
            wire_bytes: int | None = None) -> None:
        """Keep ``activations[i]`` for ``sample_ids[i]``; ``wire_bytes``: the upload's size (default: raw)."""
        if len(sample_ids) != activations.shape[0]:
            raise ValueError(f"{len(sample_ids)} sample ids for {activations.shape[0]} rows")
        if len(set(sample_ids)) != len(sample_ids):
            raise ValueError(f"sample ids repeat within one batch: {list(sample_ids)}")
        total = activations.numel() * activations.element_size() if wire_bytes is None else int(wire_bytes)
        share, extra = divmod(total, len(sample_ids))
        for i, sid in enumerate(sample_ids):
            self._acts[int(sid)] = activations[i].detach().clone()
            self._wire[int(sid)] = share + (1 if i < extra else 0)  # the shares add up to the total
        self.bytes_uploaded += total

    def get(self, sample_ids: Sequence[int]) -> torch.Tensor:
        """The kept activations of ``sample_ids``, stacked in that order; each one counts as saved bytes."""
        gone = self.missing(sample_ids)
        if gone:
            raise KeyError(f"no smashed data kept for samples {gone[:8]}")
        self.bytes_saved += sum(self._wire[s] for s in sample_ids)
        self.reused += len(sample_ids)
        return torch.stack([self._acts[s] for s in sample_ids])

    def stats(self) -> dict[str, int]:
        return {"samples": len(self), "bytes_uploaded": self.bytes_uploaded, "bytes_saved": self.bytes_saved,
                "reused": self.reused, "bytes_held": self.bytes_held}
