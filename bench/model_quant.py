"""fp32 / bf16 / int8 / int4 shards side by side in one run: decode and prefill tok/s, agreement with fp32.

Usage: nice .venv/bin/python bench/model_quant.py [--max-tokens N] [--quants bf16,int8,int4] [--threads N]
Agreement is teacher-forced top-1 over the shipped text (testbed/model/data/eval_text.txt) in 512-token
chunks through the decode kernels; speeds are best-of-3, measured interleaved so that load affects all alike.
"""

from __future__ import annotations

import testbed.omp as omp  # isort: skip  (first: the OpenMP wait policy is fixed when torch loads)

import argparse
import json
import time

import torch

from testbed.model.evaluation import CHUNK, chain_logits, chunks, decode_kernels, text_ids
from testbed.model.generate import generate_split, load_shards
from testbed.model.loading import default_model_dir, load_tokenizer
from testbed.model.quant import QuantOptions, quantize_shard

# the first version's options
OLD = QuantOptions(
    int4_exact="none", int8_layout="channel", int8_chunks=1, fuse=False, head_bits=8, head_topk=16
)
# label -> (quant, options); the plain names are the shipped defaults
VARIANTS = {
    "bf16": ("bf16", QuantOptions()),
    "int8": ("int8", QuantOptions()),
    "int4": ("int4", QuantOptions()),
    "int8-old": ("int8", OLD),
    "int4-old": ("int4", OLD),
    "int8-ch1": ("int8", QuantOptions(int8_layout="channel", int8_chunks=1)),
    "int8-ch4": ("int8", QuantOptions(int8_layout="channel", int8_chunks=4)),
    "int8-ch8": ("int8", QuantOptions(int8_layout="channel", int8_chunks=8)),
    "int8-head8": ("int8", QuantOptions(head_bits=8)),
    "int4-inexact": ("int4", QuantOptions(int4_exact="none")),
    "int4-x-attn": ("int4", QuantOptions(int4_exact="attn")),
    "int4-x-mlp": ("int4", QuantOptions(int4_exact="mlp")),
    "int4-unfused": ("int4", QuantOptions(fuse=False)),
    "int4-head8": ("int4", QuantOptions(head_bits=8)),
    "int8-bf16pre": ("int8", QuantOptions(bf16_prefill=True)),
    "int4-bf16pre": ("int4", QuantOptions(bf16_prefill=True)),
}


def load_variant(model_dir, label: str, threads: int | None):
    if label == "none":
        return load_shards(model_dir, [], "none", threads)
    quant, opts = VARIANTS[label]
    shards = load_shards(model_dir, [], "none", threads)
    for s in shards:
        quantize_shard(s, quant, model_dir, opts)
    return shards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--quants", default="bf16,int8,int4", help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads (default: the process's thread plan, testbed/omp.py)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model_dir = default_model_dir()
    ids = text_ids(load_tokenizer(model_dir), None, args.max_tokens)
    names = ["none", *[q for q in args.quants.split(",") if q]]
    models = {q: load_variant(model_dir, q, args.threads) for q in names}
    t0 = time.time()
    ref = [chain_logits(models["none"], c) for c in chunks(ids)]
    rows: dict[str, dict] = {}
    for q in names:
        same = total = 0
        diff_max = diff_sum = 0.0
        with decode_kernels():
            for c, r in zip(chunks(ids), ref, strict=True):
                lg = chain_logits(models[q], c)
                same += int((lg.argmax(-1) == r.argmax(-1)).sum())
                total += len(c)
                d = (lg - r).abs()
                diff_max, diff_sum = max(diff_max, float(d.max())), diff_sum + float(d.mean()) * len(c)
        rows[q] = {"top1": same / total, "max_diff": diff_max, "mean_diff": diff_sum / total,
                   "weight_bytes": sum(s.weight_bytes() for s in models[q]), "decode": [], "prefill": []}
    prompt, pre = ids[:32], ids[:CHUNK]
    for _ in range(args.repeats):  # interleaved
        for q in names:
            r = generate_split(models[q], prompt, args.decode_tokens)
            rows[q]["decode"].append(1e3 / r.tpot_ms)
            t = time.perf_counter()
            chain_logits(models[q], pre)
            rows[q]["prefill"].append(len(pre) / (time.perf_counter() - t))
    base = rows["none"]
    print(f"tokens={sum(len(c) for c in chunks(ids))} threads={torch.get_num_threads()} "
          f"omp={omp.in_effect()} elapsed={time.time() - t0:.0f}s")
    print(f"thread plan: {omp.summary(torch.get_num_threads())}")
    print(f"{'quant':12s} {'top1':>7s} {'maxdiff':>8s} {'decode t/s':>11s} {'x fp32':>7s} "
          f"{'prefill t/s':>12s} {'x fp32':>7s} {'MB':>7s}")
    out = {}
    for q in names:
        r = rows[q]
        dec, pf = max(r["decode"]), max(r["prefill"])
        dx, px = dec / max(base["decode"]), pf / max(base["prefill"])
        print(f"{q:12s} {r['top1']:7.2%} {r['max_diff']:8.3f} {dec:11.1f} {dx:7.2f} {pf:12.1f} {px:7.2f} "
              f"{r['weight_bytes'] / 1e6:7.1f}")
        out[q] = {"top1": r["top1"], "decode_tok_s": dec, "decode_x": dx, "prefill_tok_s": pf,
                  "prefill_x": px, "max_logit_diff": r["max_diff"], "weight_bytes": r["weight_bytes"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
