"""Split shards against the unsplit transformers model on the same weights (tiny model)."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM

from testbed.model.generate import generate_split, load_shards
from testbed.model.loading import format_prompt, load_tokenizer, prepare_model_dir
from testbed.model.shard import Shard, split_points

N_LAYERS = 4
ALL_CUTS = [list(c) for r in range(N_LAYERS) for c in itertools.combinations(range(1, N_LAYERS), r)]


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return LlamaForCausalLM.from_pretrained(str(tiny_dir), attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def prompt(tiny_dir) -> list[int]:
    return format_prompt(load_tokenizer(tiny_dir), "hello world, what is two plus two?")


def _ref_tokens(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_split_points() -> None:
    assert split_points([8, 20], 30) == [(0, 8), (8, 20), (20, 30)]
    assert split_points([], 30) == [(0, 30)]
    for bad in ([0], [30], [5, 5]):
        with pytest.raises(ValueError):
            split_points(bad, 30)


@pytest.mark.parametrize("cuts", ALL_CUTS, ids=lambda c: "cuts=" + ("-".join(map(str, c)) or "none"))
def test_split_logits_equal_unsplit(tiny_dir, reference, prompt, cuts) -> None:
    shards = load_shards(tiny_dir, cuts)
    with torch.no_grad():
        want = reference(torch.tensor([prompt])).logits
    h = torch.tensor([prompt])
    for s in shards:
        h = s(h, s.new_cache(), 0)
    assert h.shape == want.shape and h.dtype == torch.float32
    assert float((h - want).abs().max()) == 0.0


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv", "no-kv"])
@pytest.mark.parametrize("cuts", ALL_CUTS, ids=lambda c: "cuts=" + ("-".join(map(str, c)) or "none"))
def test_split_generation_equals_unsplit(tiny_dir, reference, prompt, cuts, kv_cache) -> None:
    want = _ref_tokens(reference, prompt, 10)
    res = generate_split(load_shards(tiny_dir, cuts), prompt, 10, kv_cache=kv_cache)
    assert res.tokens == want
    assert len(res.per_shard_ms) == len(cuts) + 1 and all(ms > 0 for ms in res.per_shard_ms)
    assert len(res.wire_bytes) == len(cuts)


def test_cached_decode_logits_equal_full_recompute(tiny_dir, prompt) -> None:
    """Token-by-token with KV cache gives the logits of recomputing the whole sequence."""
    a, b = load_shards(tiny_dir, [2])
    ca, cb = a.new_cache(), b.new_cache()
    step = []
    for i, t in enumerate(prompt):
        step.append(b(a(torch.tensor([[t]]), ca, i), cb, i)[0, 0])
    full = b(a(torch.tensor([prompt]), None, 0), None, 0)[0]
    assert torch.allclose(torch.stack(step), full, atol=1e-4, rtol=0)
    assert torch.equal(torch.stack(step).argmax(-1), full.argmax(-1))


def test_shard_loads_only_its_tensors(tiny_dir) -> None:
    s = Shard.load(tiny_dir, 1, 3)
    assert not s.is_first and not s.is_last and s.embed_tokens is None and s.lm_head is None
    keys = s.checkpoint_keys()
    assert {k.split(".")[2] for k in keys} == {"1", "2"}
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        want = sum(f.get_tensor(k).numel() for k in keys)
    params = list(s.parameters())
    assert all(p.device.type == "cpu" for p in params)
    assert sum(p.numel() for p in params) == want
    assert len(s.layers) == 2


def test_first_and_last_shard_roles(tiny_dir) -> None:
    first, last = Shard.load(tiny_dir, 0, 1), Shard.load(tiny_dir, 3, 4)
    assert first.is_first and first.embed_tokens is not None and first.lm_head is None
    assert last.is_last and last.lm_head is not None and last.embed_tokens is None
    h = first(torch.tensor([[1, 2, 3]]), first.new_cache(), 0)
    assert h.shape == (1, 3, first.hidden_size)
    # the tied output layer of the last shard is the checkpoint's embedding table
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        assert torch.equal(last.lm_head.weight, f.get_tensor("model.embed_tokens.weight"))


def test_cache_grows_with_tokens_and_frees_on_reset(tiny_dir) -> None:
    s = Shard.load(tiny_dir, 0, 2)
    cache = s.new_cache()
    assert s.cache_bytes(cache) == 0
    s(torch.tensor([[1, 2, 3, 4]]), cache, 0)
    four = s.cache_bytes(cache)
    cfg = s.config
    per_token = 2 * len(s.layers) * cfg.num_key_value_heads * cfg.head_dim * 4
    assert four == 4 * per_token
    s(torch.tensor([[5]]), cache, 4)
    assert s.cache_bytes(cache) == 5 * per_token
    s.reset_cache(cache)
    assert s.cache_bytes(cache) == 0


def test_sessions_have_independent_caches(tiny_dir) -> None:
    s = Shard.load(tiny_dir, 0, 4)
    c1, c2 = s.new_cache(), s.new_cache()
    a = s(torch.tensor([[5, 6, 7]]), c1, 0)
    s(torch.tensor([[9, 9, 9, 9, 9]]), c2, 0)
    b = s(torch.tensor([[5, 6, 7]]), s.new_cache(), 0)
    assert torch.equal(a, b)
    assert s.cache_bytes(c1) * 5 == s.cache_bytes(c2) * 3


def test_prepare_model_dir(tiny_dir, tmp_path) -> None:
    assert prepare_model_dir(tiny_dir) == tiny_dir
    with pytest.raises(FileNotFoundError):
        prepare_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        prepare_model_dir(tmp_path / "missing.gguf")


def test_bad_range_rejected(tiny_dir) -> None:
    for a, b in ((0, 0), (2, 1), (0, 5), (-1, 2)):
        with pytest.raises(ValueError):
            Shard.load(tiny_dir, a, b)
    with pytest.raises(ValueError):
        Shard.load(tiny_dir, 0, 4, quant="fp8")
