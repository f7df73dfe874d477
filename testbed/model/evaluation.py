"""Quantization quality and speed against fp32: teacher-forced agreement, decode and prefill tok/s."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch

from testbed import omp
from testbed.model import quant as quant_mod
from testbed.model.generate import generate_split, load_shards
from testbed.model.shard import Shard

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_TEXT = DATA_DIR / "eval_text.txt"
CHUNK = 512


@contextmanager
def decode_kernels():
    """Run every row through the few-row kernels that decoding uses (no dense prompt path)."""
    saved = quant_mod.DENSE_ROWS
    quant_mod.DENSE_ROWS = 1 << 30
    try:
        yield
    finally:
        quant_mod.DENSE_ROWS = saved


def chain_logits(shards: list[Shard], ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of one chunk through all shards with fresh caches."""
    h: torch.Tensor = torch.tensor([ids], dtype=torch.long)
    for s in shards:
        h = s(h, s.new_cache(), 0)
    return h[0]


def text_ids(tok, text_file: Path | None, max_tokens: int | None) -> list[int]:
    text = Path(text_file or DEFAULT_TEXT).read_text(encoding="utf-8")
    ids = [int(i) for i in tok.encode(text)]
    return ids[:max_tokens] if max_tokens else ids


def chunks(ids: list[int], size: int = CHUNK) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size) if len(ids[i : i + size]) > 1]


def agreement(ref: list[Shard], test: list[Shard], ids: list[int]) -> dict[str, float]:
    """Teacher-forced top-1 agreement and logit differences of ``test`` against ``ref``."""
    same = total = 0
    max_diff = 0.0
    sum_diff = 0.0
    n_logits = 0
    with decode_kernels():
        for c in chunks(ids):
            a, b = chain_logits(ref, c), chain_logits(test, c)
            same += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
            diff = (a - b).abs()
            max_diff = max(max_diff, float(diff.max()))
            sum_diff += float(diff.sum())
            n_logits += diff.numel()
    return {
        "top1_agreement": same / max(total, 1), "max_logit_diff": max_diff,
        "mean_logit_diff": sum_diff / max(n_logits, 1), "tokens": total,
    }


def decode_tok_s(shards: list[Shard], prompt: list[int], n_new: int = 48, repeats: int = 3) -> float:
    """Best-of-``repeats`` decode speed with KV cache (tokens after the first, per second)."""
    best = float("inf")
    for _ in range(repeats):
        r = generate_split(shards, prompt, n_new, kv_cache=True)
        best = min(best, r.tpot_ms)
    return 1e3 / best


def prefill_tok_s(shards: list[Shard], ids: list[int], repeats: int = 3) -> float:
    """Best-of-``repeats`` speed of one prompt of ``len(ids)`` tokens."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        chain_logits(shards, ids)
        best = min(best, time.perf_counter() - t0)
    return len(ids) / best


def quant_eval(
    model_dir: Path, quant: str, text_file: Path | None = None, cuts: list[int] | None = None,
    max_tokens: int | None = None, threads: int | None = None, speed: bool = True,
) -> dict:
    """Everything ``testbed quant-eval`` prints."""
    from testbed.model.loading import load_tokenizer

    cuts = cuts or []
    tok = load_tokenizer(model_dir)
    ids = text_ids(tok, text_file, max_tokens)
    if len(ids) < 2:
        raise ValueError("the evaluation text has fewer than 2 tokens")
    ref = load_shards(model_dir, cuts, "none", threads)
    test = load_shards(model_dir, cuts, quant, threads)
    out: dict = {"quant": quant, "cuts": cuts, "int4_source": getattr(test[0], "int4_source", None)}
    out.update(agreement(ref, test, ids))
    if speed:
        prompt = ids[:32]
        pre = ids[:CHUNK]
        out["decode_tok_s"], out["decode_tok_s_fp32"] = decode_tok_s(test, prompt), decode_tok_s(ref, prompt)
        out["prefill_tok_s"], out["prefill_tok_s_fp32"] = prefill_tok_s(test, pre), prefill_tok_s(ref, pre)
        out["prefill_tokens"] = len(pre)
    out["omp"] = omp.in_effect()
    out["thread_plan"] = omp.summary(torch.get_num_threads())  # threads, wait and why
    out["weight_bytes"] = sum(s.weight_bytes() for s in test)
    out["weight_bytes_fp32"] = sum(s.weight_bytes() for s in ref)
    return out
