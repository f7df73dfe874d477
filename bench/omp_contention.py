"""Thread policy under contention (testbed/omp.py): int4 decode / fp32 decode, old vs new policy, one run.

Every round runs four fresh processes (libgomp reads its wait policy at load), alternating the order of
the policies from round to round so that drift on the machine hits both:
  quiet  old   TESTBED_OMP=spin, 2 threads (the one-process default before the thread plan)
  quiet  new   the process's own plan (cores, cgroup quota, busy processes sampled at start)
  (quiet passive2: TESTBED_OMP=passive, 2 threads, with --policies old,new,passive2)
  busy   old / new   the same with one competing busy process (a pure-Python loop) started first.
Each process loads an fp32 and a quantized shard of all layers and decodes in pairs (fp32, then the
quantized one, ``--pairs`` times after a warm-up); its figure is the median of the pairs' ratios.  The
table gives, per case, the median and the min-max over the rounds, the tok/s medians and the load
average seen at the start of each process.

    .venv/bin/python bench/omp_contention.py [--rounds 3] [--quant int4] [--pairs 3] [--tokens 24]
"""

from __future__ import annotations

import testbed.omp as omp  # isort: skip  (first: the OpenMP wait policy is fixed when torch loads)

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "Explain in two sentences why the sky is blue."
BUSY = "while True: pass"
# policy -> (TESTBED_OMP, threads); "new" is the process's own plan
POLICIES = {"old": ("spin", 2), "new": ("", None), "passive2": ("passive", 2)}


def child(policy: str, quant: str, pairs: int, tokens: int) -> dict:
    """Runs in a fresh process with the policy's environment already set."""
    import torch

    from testbed.model.generate import generate_split, load_shards
    from testbed.model.loading import default_model_dir, format_prompt, load_tokenizer

    load = os.getloadavg()[0]
    model = default_model_dir()
    ids = format_prompt(load_tokenizer(model), PROMPT)
    threads = POLICIES[policy][1]  # None: the plan (testbed.model.shard.set_threads)
    fp32, quantized = load_shards(model, [], "none", threads), load_shards(model, [], quant, threads)
    generate_split(fp32, ids, 4)
    generate_split(quantized, ids, 4)
    f_tok, q_tok, ratio = [], [], []
    for _ in range(pairs):
        f = 1e3 / generate_split(fp32, ids, tokens).tpot_ms
        q = 1e3 / generate_split(quantized, ids, tokens).tpot_ms
        f_tok.append(f)
        q_tok.append(q)
        ratio.append(q / f)
    return {"policy": policy, "load1": load, "plan": omp.summary(torch.get_num_threads()),
            "fp32": statistics.median(f_tok), "quant": statistics.median(q_tok),
            "ratio": statistics.median(ratio)}


def run(policy: str, args: argparse.Namespace) -> dict:
    drop = (omp.ENV_VAR, omp.THREADS_VAR, "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if POLICIES[policy][0]:
        env[omp.ENV_VAR] = POLICIES[policy][0]
    argv = [sys.executable, __file__, "--child", policy, "--quant", args.quant, "--pairs", str(args.pairs),
            "--tokens", str(args.tokens)]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.splitlines()[-1])


def spread(xs: list[float], fmt: str = ".2f") -> str:
    return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--policies", default="old,new", help=f"from {', '.join(POLICIES)}")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quant, args.pairs, args.tokens)))
        return 0
    policies = [p for p in args.policies.split(",") if p]
    got: dict[tuple[str, str], list[dict]] = {}
    t0 = time.time()
    for r in range(args.rounds):
        for cond in ("quiet", "busy"):
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if cond == "busy" else None
            try:
                if busy:
                    time.sleep(1.0)  # running before the process under test samples the machine
                for policy in (policies if r % 2 == 0 else policies[::-1]):
                    out = run(policy, args)
                    got.setdefault((cond, policy), []).append(out)
                    print(json.dumps({"round": r, "cond": cond, **out}), file=sys.stderr)
            finally:
                if busy:
                    busy.kill()
                    busy.wait()
    print(f"{args.quant} decode / fp32 decode, {args.rounds} rounds x {args.pairs} pairs, "
          f"{args.tokens} tokens, {os.cpu_count()} cores, {time.time() - t0:.0f} s; "
          "median (min-max over rounds)")
    print("| machine | policy | threads, wait | fp32 tok/s | int4 tok/s | int4 / fp32 | load avg (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for cond in ("quiet", "busy"):
        for policy in policies:
            rows = got[(cond, policy)]
            loads = ", ".join(f"{o['load1']:.1f}" for o in rows)
            plans = sorted({f"{o['plan']['threads']}, {o['plan']['wait']}" for o in rows})
            print(f"| {cond} | {policy} | {' / '.join(plans)} | {spread([o['fp32'] for o in rows], '.1f')} | "
                  f"{spread([o['quant'] for o in rows], '.1f')} | {spread([o['ratio'] for o in rows])} | "
                  f"{loads} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
