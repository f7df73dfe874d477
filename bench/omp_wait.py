"""OpenMP wait policy (testbed/omp.py): passive vs spin, side by side in one run (SmolLM2, 2 threads).

Three cases, each run under both policies in fresh processes (libgomp reads its policy at load):
  one        one process decoding alone (tok/s after the first token, best of 4);
  concurrent two such processes decoding at the same time on the same cores (sum of their tok/s);
  chain      three shard processes (cuts 8,20) over loopback ZeroMQ serving one session (median TPOT).

    .venv/bin/python bench/omp_wait.py [--quant int4] [--rounds 2]
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
from pathlib import Path

PROMPT = "Explain in two sentences why the sky is blue."
CUTS = (8, 20)
CONCURRENT_S = 20.0


def child(case: str, quant: str, start_file: str | None) -> dict:
    """Runs in a fresh process with the policy already in its environment."""
    import torch

    from testbed.model.generate import generate_split, load_shards
    from testbed.model.loading import default_model_dir, format_prompt, load_tokenizer

    model = default_model_dir()
    ids = format_prompt(load_tokenizer(model), PROMPT)
    out = {"omp": omp.in_effect(), "case": case}
    if case == "one":
        shards = load_shards(model, [], quant, 2)
        out["tok_s"] = max(1e3 / generate_split(shards, ids, 32).tpot_ms for _ in range(4))
    elif case == "concurrent":
        shards = load_shards(model, [], quant, 2)
        generate_split(shards, ids, 4)
        while start_file and not Path(start_file).exists():
            time.sleep(0.01)
        t0, tpot = time.monotonic(), []
        while time.monotonic() - t0 < CONCURRENT_S:
            tpot.append(generate_split(shards, ids, 16).tpot_ms)
        out["tok_s"] = 1e3 / statistics.median(tpot)
    else:
        from testbed.apps.inference.local_chain import loopback_chain
        from testbed.apps.inference.placement import Stage
        from testbed.apps.inference.split_client import SplitClient

        shards = load_shards(model, list(CUTS), quant, 2)
        stages = [Stage("a", 0, CUTS[0]), Stage("b", CUTS[0], CUTS[1]), Stage("c", CUTS[1], shards[-1].end)]
        steps: list[float] = []
        with loopback_chain(model, stages, quant=quant, threads=2) as addrs:
            for r in range(4):
                client = SplitClient(shards[0], addrs[1], layers=[s.layers for s in stages])
                try:
                    got = client.generate(torch.tensor([ids]), 24, set())
                finally:
                    client.close()
                if r:
                    steps += got["token_ms"][1:]
        out["tok_s"] = 1e3 / statistics.median(steps)
    return out


def run(policy: str, case: str, quant: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env[omp.ENV_VAR] = policy
    argv = [sys.executable, __file__, "--child", case, "--quant", quant]
    if case != "concurrent":
        res = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
        return json.loads(res.stdout.splitlines()[-1])["tok_s"]
    start = Path(f"/tmp/omp-wait-{os.getpid()}")
    start.unlink(missing_ok=True)
    procs = [subprocess.Popen([*argv, "--start-file", str(start)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(25)  # both loaded and warm
    start.touch()
    outs = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs]
    start.unlink(missing_ok=True)
    return sum(o["tok_s"] for o in outs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", default=None)
    ap.add_argument("--start-file", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quant, args.start_file)))
        return 0
    cases = ("one", "concurrent", "chain")
    got: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):  # alternate the policies so that load affects both alike
        for case in cases:
            for policy in omp.POLICIES:
                got.setdefault((policy, case), []).append(run(policy, case, args.quant))
    print(f"{args.quant}, 2 threads per process, {args.rounds} rounds (median), decode tok/s")
    print(f"| case | {' | '.join(omp.POLICIES)} | spin / passive |")
    print("|---|---|---|---|")
    for case in cases:
        med = {p: statistics.median(got[(p, case)]) for p in omp.POLICIES}
        print(f"| {case} | {' | '.join(f'{med[p]:.1f}' for p in omp.POLICIES)} | "
              f"{med['spin'] / med['passive']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
