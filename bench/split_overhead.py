"""Overhead of split inference, measured side by side in one run (SmolLM2-135M, KV cache on).

1. loopback: per-token time (TPOT) with the shards as separate processes talking ZeroMQ over
   loopback vs the same shards in one process (goal: ratio <= 1.05).  Runs alternate A/B and
   the median of each is compared.
2. emulated link: per-token time across an emulated topology vs the analytic bound
   sum(shard compute) + bytes / bandwidth + propagation delay (goal: ratio <= 1.10); needs root.
   The compute term is what the shard nodes themselves measured in that run.

    .venv/bin/python bench/split_overhead.py [--tokens 32] [--rounds 5] [--skip-network]
"""

from __future__ import annotations

import testbed.omp as omp  # isort: skip  (first: the OpenMP wait policy is fixed when torch loads)

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

from testbed.apps.inference.local_chain import loopback_chain
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.split_client import SplitClient
from testbed.model.generate import generate_split, load_shards
from testbed.model.loading import default_model_dir, format_prompt, load_tokenizer
from testbed.model.shard import load_config

PROMPT = "Explain in two sentences why the sky is blue."
CUTS = (8, 20)
TOPOLOGY = """\
name: overhead-bench
nodes:
  phone: {role: device}
  mec: {role: edge}
  cloud: {role: cloud}
links:
  - between: [phone, mec]
    up: {bw_mbit: %(up1)s, delay_ms: %(d1)s}
    down: {bw_mbit: %(down1)s, delay_ms: %(d1)s}
  - between: [mec, cloud]
    up: {bw_mbit: %(up2)s, delay_ms: %(d2)s}
    down: {bw_mbit: %(up2)s, delay_ms: %(d2)s}
"""
LINKS = {"up1": 5, "down1": 20, "d1": 10, "up2": 100, "d2": 5}


def loopback(model: Path, tokens: int, rounds: int) -> None:
    os.environ.setdefault(omp.ENV_VAR, omp.policy_name())  # the nodes wait as this process does
    shards = load_shards(model, list(CUTS), threads=2)
    n = shards[-1].end
    stages = [Stage("a", 0, CUTS[0]), Stage("b", CUTS[0], CUTS[1]), Stage("c", CUTS[1], n)]
    ids = format_prompt(load_tokenizer(model), PROMPT)
    local, split = [], []
    compute_local = compute_split = 0.0
    with loopback_chain(model, stages, threads=2) as addrs:
        for r in range(rounds + 1):
            ref = generate_split(shards, ids, tokens)
            client = SplitClient(shards[0], addrs[1], layers=[s.layers for s in stages])
            try:
                got = client.generate(torch.tensor([ids]), tokens, set())
            finally:
                client.close()
            assert got["tokens"] == ref.tokens, "split and in-process generations differ"
            if r:  # the first round warms both up; decode steps only (the first step is the prefill)
                local += ref.step_ms[1:]
                split += got["token_ms"][1:]
                compute_local += sum(ref.per_shard_ms)
                compute_split += sum(h["compute_ms"] for h in got["per_hop"])
    print(f"loopback ZeroMQ, 3 shards (cuts {CUTS}), {rounds} rounds x {tokens - 1} decode steps, "
          f"alternating in-process / split, OpenMP wait {omp.in_effect()}")
    for name, f in (("median", statistics.median), ("mean", statistics.fmean), ("min", min)):
        a, b = f(local), f(split)
        print(f"  per-token {name:>6}: in-process {a:.2f} ms  split {b:.2f} ms  ratio {b / a:.3f}")
    print(f"  shard compute, all steps: in-process {compute_local:.0f} ms, split (measured in the nodes) "
          f"{compute_split:.0f} ms, ratio {compute_split / compute_local:.3f}")
    print("  goal: median ratio <= 1.05")


def network(model: Path, tokens: int, shaper: str) -> None:
    from testbed.apps.inference.run import run_split_inference
    from testbed.spec.topology import load_topology

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "overhead.yaml"
        path.write_text(TOPOLOGY % LINKS)
        topo = load_topology(path)
    n = load_config(model).num_hidden_layers
    placement = f"phone=0:{CUTS[0]},mec={CUTS[0]}:{CUTS[1]},cloud={CUTS[1]}:{n}"
    res = run_split_inference(topo, placement, PROMPT, max_new_tokens=tokens, shaper=shaper, model=model)
    steps = len(res["token_ms"])
    hops = res["per_hop"]
    compute = sum(h["compute_ms"] + h["codec_ms"] for h in hops)
    bw = [(LINKS["up1"], LINKS["down1"], LINKS["d1"]), (LINKS["up2"], LINKS["up2"], LINKS["d2"])]
    wire = 0.0
    for h, (up, down, delay) in zip(hops[1:], bw, strict=True):
        wire += h["bytes_up"] * 8 / (up * 1e3) + h["bytes_down"] * 8 / (down * 1e3) + steps * 2 * delay
    measured = sum(res["token_ms"])
    bound = compute + wire
    print(f"emulated links ({res['shaper']} shaper): phone-mec {LINKS['up1']}/{LINKS['down1']} Mbit/s "
          f"{LINKS['d1']} ms, mec-cloud {LINKS['up2']} Mbit/s {LINKS['d2']} ms; {steps} steps")
    print(f"  measured {measured:.1f} ms = TTFT {res['ttft_ms']:.1f} + {steps - 1} x TPOT "
          f"{res['tpot_ms']:.2f}")
    print(f"  bound    {bound:.1f} ms = compute {compute:.1f} + bytes/bandwidth + delay {wire:.1f}")
    for h in hops:
        print(f"    {h['node']:>5} {h['layers']:>6} compute {h['compute_ms']:.1f} ms "
              f"transfer {h['transfer_ms']:.1f} ms up {h['bytes_up']} B down {h['bytes_down']} B")
    print(f"  ratio measured/bound: {measured / bound:.3f} (goal <= 1.10)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--shaper", default="auto")
    ap.add_argument("--skip-network", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = default_model_dir()
    loopback(model, args.tokens, args.rounds)
    if not args.skip_network and os.geteuid() == 0:
        network(model, args.tokens, args.shaper)


if __name__ == "__main__":
    main()
