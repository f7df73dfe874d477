"""Quantized shards on the tiny model: kernels against their own dequantized weights, whole-model sanity."""

from __future__ import annotations

import pytest
import torch

from testbed.model.evaluation import agreement, decode_kernels
from testbed.model.generate import generate_split, load_shards
from testbed.model.quant import (
    CandidateHead,
    FusedLinear,
    Int4Linear,
    Int8GroupLinear,
    Int8Linear,
    QuantOptions,
    quantize_int4,
    quantize_shard,
)


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(96, 128) * 0.05


def test_int4_grid_round_trip(weight) -> None:
    codes, d, m = quantize_int4(weight, 32)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    deq = codes.float().view(96, 4, 32) * d[..., None] + m[..., None]
    err = (deq.view(96, 128) - weight).abs()
    assert float(err.max()) <= float(d.max()) / 2 + 1e-6  # half a grid step at most


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int4_linear_matches_its_grid(weight, rows) -> None:
    codes, d, m = quantize_int4(weight, 32)
    lin = Int4Linear(codes, d, m)
    exact = (codes.float().view(96, 4, 32) * d[..., None] + m[..., None]).view(96, 128)
    x = torch.randn(1, rows, 128)
    y = lin(x)
    assert y.shape == (1, rows, 96) and y.dtype == torch.float32
    want = x @ exact.t()
    # bf16 activations and bf16 scales: relative error of a few 1e-3
    assert float((y - want).abs().max()) < 0.02 * float(want.abs().max())


@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_linear_matches_its_grid(weight, rows, chunks) -> None:
    lin = Int8Linear(weight, chunks)
    assert lin.qweight.dtype == torch.int8
    assert float((lin.dequantized() - weight).abs().max()) <= float(lin.scales.float().max()) * 0.51
    x = torch.randn(1, rows, 128)
    want = x @ lin.dequantized().t()
    assert float((lin(x) - want).abs().max()) < 0.02 * float(want.abs().max())


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_group_linear_matches_its_grid(rows) -> None:
    torch.manual_seed(4)
    weight = torch.randn(128, 96) * 0.05
    weight[:, 7] *= 30  # an outlier column: per-channel int8 loses the rest of each row to it
    lin = Int8GroupLinear(weight)
    assert int(lin.codes().max()) <= 255 and lin.codes().dtype == torch.uint8
    step = lin.scale[..., None].expand(128, 3, 32).reshape(128, 96)
    assert bool(((lin.dequantized() - weight).abs() <= step * 0.51).all())  # half a step of its group
    x = torch.randn(1, rows, 96)
    want = x @ lin.dequantized().t()
    assert float((lin(x) - want).abs().max()) < 0.02 * float(want.abs().max())
    # away from the outlier's group, the group scales keep 8 bits for the ordinary weights
    channel = Int8Linear(weight, 1)
    err = {k: float((m.dequantized() - weight)[:, 32:].norm())
           for k, m in (("group", lin), ("channel", channel))}
    assert err["group"] < err["channel"] / 10, err


@pytest.mark.parametrize("n", [128, 96])
def test_int4_codes_read_back_from_the_kernel_layout(n) -> None:
    """The dense path reads the codes from the packed weight; rows not in whole blocks keep a copy."""
    torch.manual_seed(6)
    codes = torch.randint(0, 16, (n, 64), dtype=torch.uint8)
    lin = Int4Linear(codes, torch.rand(n, 2) * 0.01, -torch.rand(n, 2) * 0.05, exact=True)
    assert all(torch.equal(p, codes) for p in lin.planes())
    if n == 128:
        assert lin.plane_codes is None  # nothing stored twice


def test_int8_chunks_fall_back_to_kernel_friendly_sizes() -> None:
    w = torch.randn(32, 576)
    assert Int8Linear(w, 8).chunks == 6  # 576 / 8 = 72 is no multiple of 16 (the kernel crashes on it)
    assert Int8Linear(w, 4).chunks == 4
    lin = Int8Linear(w, 8)
    x = torch.randn(1, 576)
    assert torch.allclose(lin(x), x @ lin.dequantized().t(), atol=0.05 * float((x @ w.t()).abs().max()))


def test_candidate_head_is_exact_on_its_top_k() -> None:
    torch.manual_seed(0)
    table = torch.randn(500, 64)
    head = CandidateHead(table, k=16)
    x = torch.randn(1, 5, 64)
    got = head(x)
    exact = x @ table.t()
    top = got.topk(16, dim=-1).indices
    # recomputed in fp32 from the table (summation order may differ from a full matmul in the last bit)
    assert torch.allclose(got.gather(-1, top), exact.gather(-1, top), atol=1e-4, rtol=0)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))


# random tiny weights have nearly flat logits, so min/max int4 flips many argmaxes; chance is 1/320.
# The real targets are checked on SmolLM2 in test_real_model.py.
@pytest.mark.parametrize(("quant", "floor"), [("bf16", 0.9), ("int8", 0.8), ("int4", 0.3)])
def test_quantized_tiny_shards_run_and_agree(tiny_dir, quant, floor) -> None:
    ref = load_shards(tiny_dir, [2], "none")
    test = load_shards(tiny_dir, [2], quant)
    assert test[0].quant == quant
    assert sum(s.weight_bytes() for s in test) < sum(s.weight_bytes() for s in ref)
    torch.manual_seed(1)
    ids = torch.randint(3, ref[0].config.vocab_size, (200,)).tolist()
    a = agreement(ref, test, ids)
    assert a["tokens"] == 200
    assert a["top1_agreement"] >= floor, a
    assert 0 < a["max_logit_diff"] < 5.0
    res = generate_split(test, ids[:8], 6)
    assert len(res.tokens) == 6


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_decode_kernels_and_dense_prompt_path_agree(tiny_dir, quant) -> None:
    # the first shard's hidden states (the last shard's non-candidate logits are only scores)
    first = load_shards(tiny_dir, [2], quant)[0]
    ids = torch.arange(3, 60).unsqueeze(0)  # 57 rows: the dense path
    dense = first(ids, None, 0)
    with decode_kernels():
        kern = first(ids, None, 0)
    assert float((dense - kern).abs().max()) < 0.02 * float(dense.abs().max())


@pytest.mark.parametrize("quant", ["int8", "int4", "bf16"])
def test_lean_forward_equals_transformers_layers(tiny_dir, quant) -> None:
    """The lean forward runs the same quantized weights as transformers' layers: prompt, decode steps with
    a KV cache, and a second chunk of several tokens after cached ones (the explicit mask)."""
    (s,) = load_shards(tiny_dir, [], quant)
    assert s.lean
    ids = torch.arange(3, 23).unsqueeze(0)
    outs = {}
    for lean in (True, False):
        s.lean = lean
        cache = s.new_cache()
        steps = [s(ids[:, :12], cache, 0), s(ids[:, 12:13], cache, 12), s(ids[:, 13:], cache, 13)]
        outs[lean] = (steps, s.cache_bytes(cache))
    for a, b in zip(outs[True][0], outs[False][0], strict=True):
        assert float((a - b).abs().max()) < 1e-3 * float(b.abs().max()), float((a - b).abs().max())
    assert outs[True][1] == outs[False][1] > 0


def test_int4_on_non_gguf_checkpoint_reports_its_source(tiny_dir) -> None:
    (s,) = load_shards(tiny_dir, [], "int4")
    assert s.int4_source == "minmax-g32"
    assert isinstance(s.layers[0].mlp.down_proj, Int4Linear)


def test_int4_exact_scales_keep_fp16_grid() -> None:
    """fp16 scales that bf16 cannot hold: the remainder copy makes the kernel reproduce the grid."""
    torch.manual_seed(5)
    codes = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    d = (torch.rand(64, 4) * 0.01 + 0.001).half().float()
    m = (-torch.rand(64, 4) * 0.05).half().float()
    assert not torch.equal(d.bfloat16().float(), d)  # the case this is about
    exact_w = (codes.float().view(64, 4, 32) * d[..., None] + m[..., None]).view(64, 128)
    x = torch.randn(2, 128).bfloat16().float()  # bf16-exact input: only the weights can differ
    want = x @ exact_w.t()
    rounded = want.bfloat16().float()  # the kernel rounds its fp32 sums to bf16 once
    hit = {e: float((Int4Linear(codes, d, m, exact=e)(x) == rounded).float().mean()) for e in (False, True)}
    assert hit[True] >= 0.98 and hit[False] < 0.85, hit


def test_fused_parts_equal_separate_layers(tiny_dir) -> None:
    sep = load_shards(tiny_dir, [], "none")[0]
    fused = load_shards(tiny_dir, [], "none")[0]
    quantize_shard(sep, "int4", tiny_dir, QuantOptions(fuse=False))
    quantize_shard(fused, "int4", tiny_dir, QuantOptions(fuse=True))
    assert isinstance(fused.layers[0].self_attn.fused_q_k_v, FusedLinear)
    assert isinstance(fused.layers[0].mlp.fused_gate_up, FusedLinear)
    ids = torch.arange(3, 20).unsqueeze(0)
    with decode_kernels():
        for rows in (ids, ids[:, :1]):
            a, b = sep(rows, None, 0), fused(rows, None, 0)
            assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    # generation with a KV cache runs through the fused parts too
    res = generate_split([fused], ids[0, :6].tolist(), 5)
    assert res.tokens == generate_split([sep], ids[0, :6].tolist(), 5).tokens


def test_bf16_prefill_copy_serves_prompts(tiny_dir) -> None:
    plain = load_shards(tiny_dir, [2], "int4")[0]
    cached = load_shards(tiny_dir, [2], "none")[0]
    quantize_shard(cached, "int4", tiny_dir, QuantOptions(bf16_prefill=True))
    assert cached.layers[0].mlp.down_proj.dense_bf16.dtype == torch.bfloat16
    assert cached.weight_bytes() > plain.weight_bytes()
    ids = torch.arange(3, 60).unsqueeze(0)  # 57 rows: the dense path
    with decode_kernels():
        kern = plain(ids, None, 0)
    dense = cached(ids, None, 0)
    assert float((dense - kern).abs().max()) < 0.02 * float(kern.abs().max())
