"""A lean forward pass through a shard's decoder layers, for quantized shards.

It runs the same weights as transformers' ``LlamaDecoderLayer`` (norm weights, quantized or fused linear
layers, the shard's rotary embedding, the session's ``DynamicCache``) but with fewer, larger ops: one
fused RMSNorm op, linear layers called straight on their kernels (one op casts and repeats their input,
their bf16 output goes on without a cast back where an fp32 op reads it anyway), one rotary application
for queries and keys together, grouped-query attention without repeating keys and values, and no mask
or keyword plumbing per layer.  A decode step of the int4 shard is a few hundred small ops, so dispatch
and Python overhead are a large part of it.  fp32 shards keep transformers' own layers: they are the
exact reference that split inference must equal.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from testbed.model.quant import FusedLinear


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _project(mod: nn.Module, x2: torch.Tensor) -> torch.Tensor:
    """Rows [m, k] through a (fused) quantized linear layer's kernel: [m, n], bf16 or fp32."""
    inner = mod.inner if isinstance(mod, FusedLinear) else mod
    project = getattr(inner, "project", None)
    return project(x2) if project is not None else inner(x2)


def _qkv(attn: nn.Module, x2: torch.Tensor) -> torch.Tensor:
    fused = getattr(attn, "fused_q_k_v", None)
    if fused is not None:
        return _project(fused, x2).float()
    return torch.cat([_project(p, x2).float() for p in (attn.q_proj, attn.k_proj, attn.v_proj)], -1)


def _gate_up(mlp: nn.Module, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fused = getattr(mlp, "fused_gate_up", None)
    if fused is not None:
        gate, up = _project(fused, x2).float().split(fused.sizes, dim=-1)
        return gate, up
    return _project(mlp.gate_proj, x2).float(), _project(mlp.up_proj, x2).float()


def _causal_mask(t: int, past: int) -> torch.Tensor | None:
    """Boolean mask for ``t`` new queries after ``past`` cached positions; None where SDPA needs none
    (one query sees everything; a fresh prompt is SDPA's own ``is_causal``)."""
    if t == 1 or past == 0:
        return None
    return torch.ones(t, past + t, dtype=torch.bool).tril(past)


def lean_layers(
    layers: nn.ModuleList, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache,
) -> torch.Tensor:
    """Run ``h`` [1, T, H] through ``layers`` (shard-local cache indices), updating ``cache`` if given."""
    b, t, hidden = h.shape
    if b != 1:
        raise ValueError(f"the lean forward takes one sequence at a time, got a batch of {b}")
    past = cache.get_seq_length() if cache is not None else 0
    mask = _causal_mask(t, past)
    half = cos.shape[-1] // 2
    # rotate_half(x) * sin == roll(x, half) * sin with the first half of sin negated
    cos = cos.unsqueeze(1)  # [1, 1, T, D]: broadcast over heads
    sin = torch.cat((-sin[..., :half], sin[..., half:]), -1).unsqueeze(1)
    h = h.view(t, hidden)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        d = attn.head_dim
        qkv = _qkv(attn, rms_norm(layer.input_layernorm, h))  # [T, (n_q + 2 n_kv) d]
        n_q, n_kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
        n_qk = n_q + n_kv
        heads = qkv.view(t, -1, d).transpose(0, 1).unsqueeze(0)  # [1, heads, T, D]
        qk = heads[:, :n_qk]
        qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)
        q, k, v = qk[:, :n_q], qk[:, n_q:], heads[:, n_qk:]
        if cache is not None:
            k, v = cache.update(k, v, i)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True, is_causal=past == 0 and t > 1,
        )
        h = h + _project(attn.o_proj, o[0].transpose(0, 1).reshape(t, -1))
        gate, up = _gate_up(layer.mlp, rms_norm(layer.post_attention_layernorm, h))
        h = h + _project(layer.mlp.down_proj, layer.mlp.act_fn(gate) * up)
    return h.view(1, t, hidden)
