"""A transformer shard: decoder layers ``[start, end)`` of a LLaMA checkpoint, loaded on their own.

The first shard also owns the token embedding, the last one the final norm and the (tied) output layer.
Each shard builds its own rotary embedding and keeps one KV cache per session with shard-local layer indices.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from testbed import omp
from testbed.spec.options import QUANTS


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (at most the machine's cores); None: this process's thread plan
    (``testbed.omp``: its CPU limit and the processes busy beside it).  Returns the number set."""
    n = max(1, min(threads or omp.own_plan().threads, os.cpu_count() or 1))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def split_points(cuts: list[int], n_layers: int) -> list[tuple[int, int]]:
    """Layer ranges between cut points: ``[8, 20]`` of 30 layers -> ``[(0, 8), (8, 20), (20, 30)]``."""
    cuts = sorted(int(c) for c in cuts)
    if len(set(cuts)) != len(cuts):
        raise ValueError(f"cut points repeat: {cuts}")
    for c in cuts:
        if not 0 < c < n_layers:
            raise ValueError(f"cut point {c} outside 1..{n_layers - 1}")
    edges = [0, *cuts, n_layers]
    return list(zip(edges[:-1], edges[1:], strict=True))


def parse_cuts(text: str) -> list[int]:
    """``"8,20"`` -> ``[8, 20]``; empty -> ``[]``."""
    return [int(c) for c in text.replace(" ", "").split(",") if c]


def load_config(model_dir: Path):
    from transformers import LlamaConfig

    config = LlamaConfig.from_pretrained(str(model_dir))
    config._attn_implementation = "sdpa"
    return config


class Shard(nn.Module):
    """Layers ``[start, end)``; first shard takes token ids, last shard returns logits."""

    def __init__(self, config, start: int, end: int) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRMSNorm,
            LlamaRotaryEmbedding,
        )

        n = config.num_hidden_layers
        if not 0 <= start < end <= n:
            raise ValueError(f"bad shard range {start}:{end} for {n} layers")
        self.config = config
        self.start, self.end = start, end
        self.is_first, self.is_last = start == 0, end == n
        self.hidden_size = config.hidden_size
        self.quant = "none"
        self.lean = False  # quantized shards run testbed.model.lean's forward instead of transformers' layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if self.is_first else None
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, layer_idx=i) for i in range(end - start))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if self.is_last else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if self.is_last else None
        self.rotary_emb = LlamaRotaryEmbedding(config=config)

    # -- loading ------------------------------------------------------------------------------
    def checkpoint_keys(self) -> dict[str, str]:
        """Checkpoint tensor name -> local parameter name, for exactly this shard's tensors."""
        keys: dict[str, str] = {}
        if self.is_first:
            keys["model.embed_tokens.weight"] = "embed_tokens.weight"
        for local, layer in enumerate(self.layers):
            for pname, _ in layer.named_parameters():
                keys[f"model.layers.{self.start + local}.{pname}"] = f"layers.{local}.{pname}"
        if self.is_last:
            keys["model.norm.weight"] = "norm.weight"
        return keys

    @classmethod
    def load(
        cls, model_dir: Path, start: int, end: int, quant: str = "none", threads: int | None = None,
        adapter: str | Path | None = None,
    ) -> Shard:
        """Build on the meta device, then read only this shard's tensors from the checkpoint.

        ``adapter``: a peft LoRA folder whose layers ``start:end`` are merged into the fp32 weights
        (``testbed.model.adapter``) before any quantization; int4 then quantizes the merged weights
        group-wise (min/max per 32), the GGUF's own grid being the base's."""
        from safetensors import safe_open

        if quant not in QUANTS:
            raise ValueError(f"unknown quant {quant!r} (choose from {', '.join(QUANTS)})")
        set_threads(threads)
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        with torch.device("meta"):
            shard = cls(config, start, end)
        state: dict[str, torch.Tensor] = {}
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
            present = set(f.keys())
            for ckpt, local in shard.checkpoint_keys().items():
                state[local] = f.get_tensor(ckpt)
            if shard.is_last:
                head = "lm_head.weight" if "lm_head.weight" in present else "model.embed_tokens.weight"
                if head == "model.embed_tokens.weight" and shard.is_first:
                    state["lm_head.weight"] = state["embed_tokens.weight"]
                else:
                    state["lm_head.weight"] = f.get_tensor(head)
        shard.load_state_dict(state, strict=True, assign=True)
        # rotary inverse frequencies are buffers computed from the config, not stored in the checkpoint
        shard.rotary_emb = type(shard.rotary_emb)(config=config)
        shard.eval().requires_grad_(False)
        shard.adapter_layers = []
        if adapter is not None:
            from testbed.model.adapter import merge_adapter

            shard.adapter_layers = merge_adapter(shard, adapter)
        if quant != "none":
            from testbed.model.quant import quantize_shard

            # merged layers no longer match the GGUF's Q4_1 grid (None: group-wise int4 instead)
            quantize_shard(shard, quant, None if shard.adapter_layers else model_dir)
        return shard

    # -- running --------------------------------------------------------------------------------
    def new_cache(self):
        """A fresh per-session KV cache (layers indexed 0..len(layers)-1)."""
        from transformers import DynamicCache

        return DynamicCache()

    @staticmethod
    def reset_cache(cache) -> None:
        """Drop every cached key/value tensor (frees the memory)."""
        if cache is not None:
            cache.reset()

    def cache_bytes(self, cache) -> int:
        """Bytes held by the keys and values in ``cache``."""
        total = 0
        for layer in getattr(cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, cache=None, position_start: int = 0) -> torch.Tensor:
        """First shard: ids [1, T]; others: hidden [1, T, H].  Returns hidden or logits [1, T, V]."""
        if self.is_first:
            h = self.embed_tokens(x)
        else:
            h = x if x.dtype == torch.float32 else x.float()
        t = h.shape[1]
        position_ids = torch.arange(position_start, position_start + t).unsqueeze(0)
        pos_emb = self.rotary_emb(h, position_ids=position_ids)
        if self.lean:
            from testbed.model.lean import lean_layers, rms_norm

            h = lean_layers(self.layers, h, *pos_emb, cache)
            if self.is_last:
                h = rms_norm(self.norm, h)
        else:
            h = self._hf_layers(h, cache, position_ids, pos_emb)
            if self.is_last:
                h = self.norm(h)
        return self.lm_head(h).float() if self.is_last else h

    def _hf_layers(self, h: torch.Tensor, cache, position_ids: torch.Tensor, pos_emb) -> torch.Tensor:
        """transformers' own decoder layers: the exact fp32 reference."""
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(
            config=self.config, inputs_embeds=h, attention_mask=None,
            cache=cache, position_ids=position_ids,
        )
        for layer in self.layers:
            h = layer(
                h, attention_mask=mask, position_embeddings=pos_emb, position_ids=position_ids,
                cache=cache, use_cache=cache is not None,
            )
        return h

    def weight_bytes(self) -> int:
        """Bytes of parameters and buffers (quantized weights counted at their stored size)."""
        seen: set[int] = set()
        total = 0
        for t in list(self.parameters()) + list(self.buffers()):
            if t.device.type == "meta" or id(t) in seen or t.data_ptr() in seen:
                continue
            seen.update((id(t), t.data_ptr()))
            total += t.numel() * t.element_size()
        return total
