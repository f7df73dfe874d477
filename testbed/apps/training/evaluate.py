"""Held-out perplexity of a model, per client and pooled: deterministic and batched.

The held-out tokens are cut into windows of ``seq + 1`` tokens at stride ``seq`` (the last window may be
shorter), the same windows as training uses: each held-out token after the first is predicted exactly
once, with the context of its own window (no sliding window; the context a token gets depends only on
``seq``, so runs with the same ``seq`` are comparable).  Full windows go through the model ``batch`` at a
time, the shorter last window alone (no padding, so no attention mask is needed).

Perplexity is ``exp(mean negative log-likelihood per predicted token)``; the pooled figure pools the
tokens of all clients (a token-weighted mean of the clients' log-perplexities), so a client with more
held-out text weighs more.  Sums are taken in float64 in a fixed order: the same model and data give the
same figure bit for bit.

``model`` is any callable from input ids ``[B, T]`` (int64) to logits ``[B, T, V]`` or an object with
``.logits`` (a transformers model, a peft model, a chain of shards).

Public API: :class:`Perplexity`, :func:`windows`, :func:`perplexity`, :func:`evaluate_clients`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Perplexity:
    """Summed negative log-likelihood (nats) over ``tokens`` predicted tokens, and the perplexity."""

    nll: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def __add__(self, other: Perplexity) -> Perplexity:
        return Perplexity(self.nll + other.nll, self.tokens + other.tokens)


def windows(tokens: torch.Tensor, seq: int) -> list[torch.Tensor]:
    """The evaluation windows of ``tokens``: ``seq + 1`` tokens at stride ``seq``, the last one shorter."""
    tokens = tokens.reshape(-1)
    return [tokens[i : i + seq + 1] for i in range(0, len(tokens) - 1, seq)]


def _logits(model: Callable, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def perplexity(model: Callable, tokens: torch.Tensor, seq: int, batch: int = 8) -> Perplexity:
    """Perplexity of ``model`` on ``tokens`` (1-D), in eval mode and without gradients."""
    wins = windows(tokens, seq)
    full = [w for w in wins if len(w) == seq + 1]
    groups = [torch.stack(full[i : i + batch]) for i in range(0, len(full), batch)]
    groups += [w[None] for w in wins if len(w) != seq + 1]
    nll, count = 0.0, 0
    was_training = getattr(model, "training", None)
    if was_training:
        model.eval()  # no dropout while measuring
    try:
        with torch.no_grad():
            for g in groups:
                logits = _logits(model, g[:, :-1]).float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), g[:, 1:].reshape(-1),
                                       reduction="none")
                nll += float(loss.double().sum())
                count += loss.numel()
    finally:
        if was_training:
            model.train()
    return Perplexity(nll, count)


def evaluate_clients(model: Callable, heldout: Mapping[str, torch.Tensor], seq: int,
                     batch: int = 8) -> dict[str, float | dict[str, float]]:
    """``{"per_client": {name: ppl}, "pooled": ppl, "tokens": {name: n}}`` over every client's held-out text.

    ``heldout`` maps a client's name to its held-out tokens (``{c.name: c.heldout for c in clients}``).
    """
    per = {name: perplexity(model, ids, seq, batch) for name, ids in heldout.items()}
    pooled = sum(per.values(), Perplexity(0.0, 0))
    return {"per_client": {n: p.ppl for n, p in per.items()}, "pooled": pooled.ppl,
            "tokens": {n: p.tokens for n, p in per.items()}}
