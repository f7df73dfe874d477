"""Held-out perplexity: exact on models whose answer is known, batched == one window at a time, pooled."""

from __future__ import annotations

import math

import pytest
import torch

from testbed.apps.training.evaluate import Perplexity, evaluate_clients, perplexity, windows

V = 11


def bigram(table: torch.Tensor):
    """A model whose next-token log-probabilities depend on the current token only: ``table[token]``."""
    return lambda ids: table[ids]


def reference_nll(table: torch.Tensor, tokens: torch.Tensor, seq: int) -> tuple[float, int]:
    """The same figure token by token, straight from the definition (window starts reset nothing here)."""
    logp = torch.log_softmax(table.double(), dim=-1)
    nll = sum(-float(logp[int(a), int(b)]) for a, b in zip(tokens[:-1], tokens[1:], strict=True))
    return nll, len(tokens) - 1


def test_windows_predict_every_token_once() -> None:
    t = torch.arange(23)
    ws = windows(t, 5)
    assert [w.tolist()[0] for w in ws] == [0, 5, 10, 15, 20] and len(ws[-1]) == 3
    targets = torch.cat([w[1:] for w in ws])
    assert torch.equal(targets, t[1:])
    assert len(windows(torch.arange(21), 5)) == 4  # 21 tokens: four full windows, nothing left over


def test_uniform_model_has_perplexity_of_the_vocabulary() -> None:
    tokens = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(0))
    p = perplexity(lambda ids: torch.zeros(*ids.shape, V), tokens, seq=16, batch=4)
    assert p.tokens == 299 and p.ppl == pytest.approx(V, rel=1e-6)


@pytest.mark.parametrize("n", [200, 161, 17])  # with a shorter last window, exactly full, one window
def test_bigram_model_matches_the_definition_and_any_batching(n: int) -> None:
    g = torch.Generator().manual_seed(1)
    table = torch.randn(V, V, generator=g) * 2
    tokens = torch.randint(0, V, (n,), generator=g)
    nll, count = reference_nll(table, tokens, 16)
    ref = math.exp(nll / count)
    results = [perplexity(bigram(table), tokens, seq=16, batch=b) for b in (1, 3, 8, 100)]
    assert all(r.tokens == count for r in results)
    assert all(r.ppl == pytest.approx(ref, rel=1e-6) for r in results)
    assert max(r.nll for r in results) - min(r.nll for r in results) <= 1e-9 * nll


def test_pooled_is_token_weighted_and_runs_are_identical() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).train()  # evaluation switches to eval mode and back
    g = torch.Generator().manual_seed(2)
    held = {"a": torch.randint(0, V, (130,), generator=g), "b": torch.randint(0, V, (40,), generator=g)}
    r1 = evaluate_clients(model, held, seq=16, batch=4)
    r2 = evaluate_clients(model, held, seq=16, batch=4)
    assert r1 == r2 and model.training
    assert r1["tokens"] == {"a": 129, "b": 39}
    la, lb = (math.log(r1["per_client"][k]) for k in ("a", "b"))
    assert math.log(r1["pooled"]) == pytest.approx((129 * la + 39 * lb) / 168, rel=1e-9)
    # the model's own loss on one full window agrees with ours
    x = held["a"][:16][None]
    with torch.no_grad():
        own = float(model(x, labels=x.clone()).loss)  # transformers shifts the labels itself
    ours = perplexity(model, held["a"][:16], seq=16)
    assert math.log(ours.ppl) == pytest.approx(own, rel=1e-5)
    assert (Perplexity(1.0, 2) + Perplexity(3.0, 2)).ppl == pytest.approx(math.e)
