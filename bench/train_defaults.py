"""The training defaults on the real SmolLM2-135M: does a short LoRA run visibly lower held-out perplexity?

In one process, no network: peft LoRA on the whole model, AdamW, batches of ``--batch`` x ``--seq``
tokens from one corpus (a Debian fortune collection by default), held-out perplexity (the corpus's last
10%) before and after ``--steps`` steps.  The defaults of ``testbed/apps/training/defaults.py`` run side by
side with variants (a lower learning rate, fewer target modules, a higher rate), each for every seed;
the table gives the median and the spread (min..max) over the seeds.

    .venv/bin/python bench/train_defaults.py [--corpus fortunes:songs-poems] [--steps 40] [--seeds 0,1,2]
                                             [--variants default,lr2e-4,qv,lr3e-3] [--eval-tokens N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from testbed.apps.training import data, defaults
from testbed.apps.training.evaluate import perplexity
from testbed.model.loading import default_model_dir, load_tokenizer

# name -> (learning rate, target modules); rank and alpha stay at the defaults
VARIANTS: dict[str, tuple[float, tuple[str, ...]]] = {
    "default": (defaults.LR, defaults.TARGET_MODULES),
    "lr2e-4": (2e-4, defaults.TARGET_MODULES),
    "qv": (defaults.LR, ("q_proj", "v_proj")),
    "lr3e-3": (3e-3, defaults.TARGET_MODULES),
}


def run(model_dir, client: data.ClientData, lr: float, targets: tuple[str, ...], steps: int, batch: int,
        seq: int, seed: int, base_ppl: float | None) -> dict[str, float]:
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)  # LoRA's A matrices
    base = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, defaults.lora_config(targets=targets))
    logits = lambda ids: model(input_ids=ids).logits  # noqa: E731
    before = base_ppl if base_ppl is not None else perplexity(logits, client.heldout, seq).ppl
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=defaults.WEIGHT_DECAY)
    batches = data.Batches(client.train, batch, seq, seed=seed)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        b = batches.next()
        out = model(input_ids=b.inputs)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                                 b.targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    step_s = (time.perf_counter() - t0) / steps
    after = perplexity(logits, client.heldout, seq).ppl
    return {"before": before, "after": after, "first_loss": statistics.fmean(losses[:5]),
            "last_loss": statistics.fmean(losses[-5:]), "step_s": step_s}


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}..{fmt.format(max(xs))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="fortunes:songs-poems")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=defaults.BATCH)
    ap.add_argument("--seq", type=int, default=defaults.SEQ)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens to score (0: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = default_model_dir()
    tok = load_tokenizer(model_dir)
    (client,) = data.load_clients(data.parse_data(args.corpus), tok, 1, args.batch, args.seq)
    if args.eval_tokens:  # the same first held-out tokens before and after: a shorter, comparable score
        client = data.ClientData(client.name, client.train, client.heldout[: args.eval_tokens])
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"SmolLM2-135M, corpus {args.corpus}: {len(client.train)} training tokens, {len(client.heldout)} "
          f"held out; {args.steps} steps of {args.batch} x {args.seq}; rank {defaults.RANK}, "
          f"alpha {defaults.ALPHA}; seeds {seeds}; {args.threads} threads")
    base_ppl = None  # the base model's perplexity: the same for every run
    rows = []
    for name in args.variants.split(","):
        lr, targets = VARIANTS[name]
        runs = []
        for seed in seeds:
            r = run(model_dir, client, lr, targets, args.steps, args.batch, args.seq, seed, base_ppl)
            base_ppl = r["before"]
            runs.append(r)
            print(f"  {name} seed {seed}: ppl {r['before']:.2f} -> {r['after']:.2f}, loss "
                  f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}, {r['step_s']:.2f} s/step", flush=True)
        rows.append((name, lr, targets, runs))
    print()
    print(f"{'variant':<9} {'lr':>7} {'targets':<9} {'ppl before':>10} {'ppl after: median (min..max)':>30} "
          f"{'after/before':>13} {'s/step':>7}")
    for name, lr, targets, runs in rows:
        after = [r["after"] for r in runs]
        ratio = [r["after"] / r["before"] for r in runs]
        tgt = "all-7" if len(targets) == 7 else "+".join(t.split("_")[0] for t in targets)
        print(f"{name:<9} {lr:>7.0e} {tgt:<9} {runs[0]['before']:>10.2f} {spread(after):>30} "
              f"{spread(ratio, '{:.3f}'):>13} {statistics.median(r['step_s'] for r in runs):>7.2f}")


if __name__ == "__main__":
    main()
