"""Activation codecs on the real SmolLM2: bytes per token and greedy agreement with fp32.

For each prompt, fp32 split generation gives the reference continuation.  Then for each codec:
  * teacher-forced top-1 agreement: the reference sequence (prompt + continuation) goes through
    the shard chain once with the codec at every cut; the fraction of generated positions whose
    argmax equals the fp32 one;
  * free-running agreement: generate with the codec; the fraction of positions equal to fp32
    (positions after the first divergence count as they come).

    .venv/bin/python bench/split_codecs.py [--cuts 8,20] [--tokens 32]
"""

from __future__ import annotations

import argparse

import torch

from testbed.model.codecs import get_codec
from testbed.model.generate import generate_split, load_shards
from testbed.model.loading import default_model_dir, format_prompt, load_tokenizer

PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a phone talking to an edge server.",
    "List three benefits of running language models at the network edge.",
    "How do I boil an egg?",
]
CODECS = ["fp32", "fp16", "bf16", "int8"]


@torch.inference_mode()
def chain_argmax(shards, ids: list[int], codec_name: str) -> torch.Tensor:
    codec = get_codec(codec_name)
    h: torch.Tensor = torch.tensor([ids])
    for i, shard in enumerate(shards):
        h = shard(h, None, 0)
        if i < len(shards) - 1:
            h = codec.decode(codec.encode(h), tuple(h.shape))
    return h[0].argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuts", default="8,20")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = default_model_dir()
    tok = load_tokenizer(model)
    shards = load_shards(model, [int(c) for c in args.cuts.split(",")])
    hidden = shards[0].hidden_size
    forced = {c: [0, 0] for c in CODECS}
    free = {c: [0, 0] for c in CODECS}
    for prompt in PROMPTS:
        ids = format_prompt(tok, prompt)
        ref = generate_split(shards, ids, args.tokens, codec="fp32").tokens
        seq = ids + ref
        for c in CODECS:
            am = chain_argmax(shards, seq, c)[len(ids) - 1:len(seq) - 1].tolist()
            forced[c][0] += sum(a == b for a, b in zip(am, ref, strict=True))
            forced[c][1] += len(ref)
            got = generate_split(shards, ids, args.tokens, codec=c).tokens
            free[c][0] += sum(a == b for a, b in zip(got, ref, strict=False))
            free[c][1] += len(ref)
    print(f"SmolLM2-135M, cuts {args.cuts}, {len(PROMPTS)} prompts x {args.tokens} greedy tokens, "
          f"hidden {hidden}")
    print("| codec | bytes/token | vs fp32 | teacher-forced top-1 agreement | free-running agreement |")
    print("|---|---|---|---|---|")
    base = get_codec("fp32").bytes_per_token(hidden)
    for c in CODECS:
        b = get_codec(c).bytes_per_token(hidden)
        print(f"| {c} | {b} | {b / base:.3f} | {100 * forced[c][0] / forced[c][1]:.1f}% "
              f"| {100 * free[c][0] / free[c][1]:.1f}% |")


if __name__ == "__main__":
    main()
