"""Greedy generation through a chain of shards in one process (the reference for split inference)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from testbed.model.shard import Shard


@dataclass
class GenerationResult:
    """Tokens produced and where the time went."""

    tokens: list[int]
    prompt_tokens: int
    ttft_ms: float  # prompt in -> first new token out
    tpot_ms: float  # mean time per further token
    per_shard_ms: list[float]  # compute time spent in each shard, all steps
    wire_bytes: list[int]  # activation bytes sent after each shard but the last, all steps
    codec: str = "fp32"
    kv_cache: bool = True
    text: str | None = None
    step_ms: list[float] = field(default_factory=list)


def _codec(name: str):
    """The activation codec; fp32 without a codec module is a plain pass-through."""
    try:
        from testbed.model.codecs import get_codec
    except ImportError:
        if name != "fp32":
            raise
        return None
    return get_codec(name)


def _send(codec, h: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Round-trip ``h`` through the codec as if it crossed the wire; returns it and its wire size."""
    if codec is None:
        return h, h.numel() * h.element_size()
    frames = codec.encode(h)
    size = sum(memoryview(f).nbytes for f in frames)
    return codec.decode(frames, tuple(h.shape)), size


def run_chain(
    shards: list[Shard], x: torch.Tensor, caches: list, position_start: int, codec,
    per_shard_ms: list[float], wire_bytes: list[int],
) -> torch.Tensor:
    """One forward pass through all shards, timing each and counting the bytes between them."""
    h = x
    for i, shard in enumerate(shards):
        t0 = time.perf_counter()
        h = shard(h, caches[i], position_start)
        per_shard_ms[i] += (time.perf_counter() - t0) * 1e3
        if i < len(shards) - 1:
            h, n = _send(codec, h)
            wire_bytes[i] += n
    return h


def check_chain(shards: list[Shard]) -> None:
    """Shards must cover all layers in order, first to last."""
    if not shards or not shards[0].is_first or not shards[-1].is_last:
        raise ValueError("shards must start at layer 0 and end at the last layer")
    for a, b in zip(shards, shards[1:], strict=False):
        if a.end != b.start:
            raise ValueError(f"shards {a.start}:{a.end} and {b.start}:{b.end} do not meet")


def generate_split(
    shards: list[Shard], prompt_ids: list[int], max_new_tokens: int, kv_cache: bool = True,
    codec: str = "fp32", eos_ids: Iterable[int] = (),
) -> GenerationResult:
    """Greedy decoding; without KV cache every step recomputes the whole sequence."""
    check_chain(shards)
    cod = _codec(codec)
    eos = set(eos_ids)
    per_shard = [0.0] * len(shards)
    wire = [0] * (len(shards) - 1)
    caches = [s.new_cache() if kv_cache else None for s in shards]
    seq = list(prompt_ids)
    new: list[int] = []
    step_ms: list[float] = []
    pos = 0
    while len(new) < max_new_tokens:
        t0 = time.perf_counter()
        if kv_cache:
            feed = seq[pos:]
            x = torch.tensor([feed], dtype=torch.long)
            logits = run_chain(shards, x, caches, pos, cod, per_shard, wire)
            pos = len(seq)
        else:
            x = torch.tensor([seq], dtype=torch.long)
            logits = run_chain(shards, x, [None] * len(shards), 0, cod, per_shard, wire)
        tok = int(torch.argmax(logits[0, -1]).item())
        step_ms.append((time.perf_counter() - t0) * 1e3)
        new.append(tok)
        seq.append(tok)
        if tok in eos:
            break
    for s, c in zip(shards, caches, strict=True):
        s.reset_cache(c)
    ttft = step_ms[0] if step_ms else 0.0
    tpot = sum(step_ms[1:]) / (len(step_ms) - 1) if len(step_ms) > 1 else 0.0
    return GenerationResult(
        tokens=new, prompt_tokens=len(prompt_ids), ttft_ms=ttft, tpot_ms=tpot, per_shard_ms=per_shard,
        wire_bytes=wire, codec=codec, kv_cache=kv_cache, step_ms=step_ms,
    )


def load_shards(model_dir, cuts: list[int], quant: str = "none", threads: int | None = None,
                adapter=None) -> list[Shard]:
    """All shards of ``model_dir`` for the given cut points; ``adapter``: a peft LoRA folder merged in."""
    from testbed.model.shard import load_config, split_points

    n = load_config(model_dir).num_hidden_layers
    return [Shard.load(model_dir, a, b, quant=quant, threads=threads, adapter=adapter)
            for a, b in split_points(cuts, n)]
