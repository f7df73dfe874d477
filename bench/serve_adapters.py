"""Multi-tenant LoRA serving on SmolLM2-135M (testbed/apps/caching/serving.py), side by side in one run:

  mixed     a batch of 8 requests for 8 distinct adapters, decoded together (peft mixed-adapter batch)
  one       a batch of 8 requests on one adapter (peft's plain path)
  serial    the same 8 requests as "mixed", served one after another (batch of 1 each)

Rounds alternate the three cases; the figure is the median tokens/s over rounds (min-max shown).
Goals: mixed >= 0.7x one, mixed >= 3x serial.  Adapters are generated (random, rank 8, q/v).
``--backend peft`` measures peft's own mixed-adapter batches instead of the stacked (BGMV) backend.

    .venv/bin/python bench/serve_adapters.py [--rounds 3] [--tokens 32] [--threads 2] [--backend B]
                                             [--clock wall|cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from testbed.apps.caching.serving import (  # noqa: E402
    BACKENDS,
    DEFAULT_PROMPTS,
    batch_of,
    bench_setup,
    measure,
)
from testbed.model.loading import default_model_dir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", choices=BACKENDS, default="stacked")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: tokens per CPU-second of this process (with --threads 1 on a busy machine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setup = bench_setup(default_model_dir(), args.batch, args.rank, 1, DEFAULT_PROMPTS, args.backend)
    mixed = batch_of(setup, args.batch, args.batch)
    one = batch_of(setup, args.batch, 1)
    measure(setup, mixed[:2], 4, 1)  # warm-up
    key = "tokens_per_cpu_s" if args.clock == "cpu" else "tokens_per_s"
    rates: dict[str, list[float]] = {"mixed": [], "one": [], "serial": []}
    for _ in range(args.rounds):
        rates["mixed"].append(measure(setup, mixed, args.tokens, 1)[key])
        rates["one"].append(measure(setup, one, args.tokens, 1)[key])
        rates["serial"].append(measure(setup, mixed, args.tokens, 1, one_by_one=True)[key])
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {"model": "SmolLM2-135M", "backend": args.backend, "clock": args.clock,
           "load_avg": os.getloadavg()[0],
           "batch": args.batch, "rank": args.rank, "tokens": args.tokens,
           "threads": args.threads, "rounds": args.rounds, "memory": setup.server.memory(),
           "tokens_per_s": {k: {"median": med[k], "min": min(v), "max": max(v)} for k, v in rates.items()},
           "mixed_over_one": med["mixed"] / med["one"], "mixed_over_serial": med["mixed"] / med["serial"]}
    if args.json:
        print(json.dumps(out))
        return 0
    mem = out["memory"]
    print(f"backend {args.backend}, {args.threads} threads, load average {out['load_avg']:.1f}, "
          f"{'tokens per CPU-second' if args.clock == 'cpu' else 'tokens per second'}")
    print(f"memory: base {mem['base_bytes'] / 1e6:.1f} MB + {mem['adapters']} adapters "
          f"{mem['adapter_bytes'] / 1e6:.2f} MB = {mem['total_bytes'] / 1e6:.1f} MB")
    print(f"| case | {key} median (min-max) |\n|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {med[k]:.1f} ({min(v):.1f}-{max(v):.1f}) |")
    print(f"mixed / one = {out['mixed_over_one']:.2f} (goal >= 0.7); "
          f"mixed / serial = {out['mixed_over_serial']:.2f} (goal >= 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
