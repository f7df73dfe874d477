"""Tokens/s of a SmolLM2-135M LoRA training step: the testbed's training (``--local``: the stages in one
process) next to plain PyTorch + peft (``transformers``' LlamaForCausalLM with ``get_peft_model``) in one
process on the same cores, the same LoRA recipe (rank 8, alpha 16, every linear of a block, AdamW) and
the same batch x seq.  Runs alternate; the first step of each run is left out (warm-up); the table gives
the median (min..max) over the repeats of each run's tokens/s over its remaining steps.

    .venv/bin/python bench/train_tokens.py [--steps 5] [--repeats 3] [--batch 4] [--seq 64] [--threads 2]
"""

from __future__ import annotations

import testbed.omp  # noqa: F401  # isort: skip  (first: the OpenMP wait policy is fixed when torch loads)

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from train_common import model_dir, options, spread, train

from testbed.apps.training import defaults


def plain_peft(model: Path, steps: int, batch: int, seq: int, seed: int) -> list[float]:
    """Step times (ms) of a plain transformers + peft LoRA loop on random token batches."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    net = get_peft_model(base, defaults.lora_config())
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=defaults.LR,
                            weight_decay=defaults.WEIGHT_DECAY)
    net.train()
    ids = torch.randint(0, base.config.vocab_size, (steps, batch, seq + 1))
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        logits = net(input_ids=ids[s, :, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ids[s, :, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokens = args.batch * args.seq
    rates: dict[str, list[float]] = {"testbed --local": [], "plain PyTorch+peft": []}
    with tempfile.TemporaryDirectory() as work:
        model = model_dir("default", Path(work))
        print(f"SmolLM2-135M LoRA, {args.steps} steps of {args.batch} x {args.seq} (first left out), "
              f"{args.threads} threads, {args.repeats} repeats; load {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores")
        for r in range(args.repeats):
            opt = options(steps=args.steps, batch=args.batch, seq=args.seq)
            res = train(model, "dev=0:15,mec=15:30", opt, "local")
            ms = res["step_ms"][1:]
            rates["testbed --local"].append(tokens * len(ms) / (sum(ms) / 1e3))
            ms = plain_peft(model, args.steps, args.batch, args.seq, r)[1:]
            rates["plain PyTorch+peft"].append(tokens * len(ms) / (sum(ms) / 1e3))
            shown = ", ".join(f"{k} {v[-1]:.0f} tokens/s" for k, v in rates.items())
            print(f"  repeat {r}: {shown}", flush=True)
    print()
    for k, v in rates.items():
        print(f"{k:>20} | tokens/s {spread(v, '{:.0f}')}")
    a, b = (statistics.median(v) for v in rates.values())
    print(f"testbed / plain: {a / b:.2f}")


if __name__ == "__main__":
    main()
