"""Overhead of split training: one client, loopback, fp32, step time vs ``--local`` (goal <= 1.10x).

The same training (same seed, data, batches) runs in one process (``--local``) and with the device and
the stage server as separate processes talking ZeroMQ over loopback; runs alternate local/loopback and
each run's median step time counts (the first step, which warms the allocator, is included in the run
but not decisive for its median).  The ratio is loopback / local of the medians over the repeats; a
second figure pools every step but each run's first (steps on this machine vary by tens of per cent
even with nothing stolen, so the pooled median and quartiles resolve a 10 % goal better than a few
runs' medians do).

    .venv/bin/python bench/train_split_overhead.py [--model default|tiny:N] [--cut 4] [--steps 6]
                                                   [--repeats 3] [--batch 4] [--seq 64]
"""

from __future__ import annotations

import testbed.omp  # noqa: F401  # isort: skip  (first: the OpenMP wait policy is fixed when torch loads)

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from train_common import model_dir, options, spread, train

from testbed.apps.training.run import model_layers
from testbed.hosts.machine_load import cpu_times, load_between


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--cut", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        model = model_dir(args.model, Path(work))
        layers = model_layers(model)
        placement = f"dev=0:{args.cut},mec={args.cut}:{layers}"
        opt = options(steps=args.steps, batch=args.batch, seq=args.seq)
        print(f"model {args.model} ({layers} layers), placement {placement}, {args.steps} steps of "
              f"{args.batch} x {args.seq}, fp32, {args.repeats} repeats alternating; load "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        med: dict[str, list[float]] = {"local": [], "loopback": []}
        pooled: dict[str, list[float]] = {"local": [], "loopback": []}
        losses: dict[str, list[float]] = {}
        for r in range(args.repeats):
            for mode in ("local", "loopback"):
                before = cpu_times()
                res = train(model, placement, opt, mode)
                load = load_between(before, cpu_times())  # the hypervisor's share: vCPUs woken late
                med[mode].append(statistics.median(res["step_ms"]))
                pooled[mode] += res["step_ms"][1:]
                losses[mode] = res["losses"]
                print(f"  repeat {r} {mode:>8}: step ms median {med[mode][-1]:.1f}, "
                      f"per step {res['step_ms']}; machine {load}", flush=True)
    ratio = [b / a for a, b in zip(med["local"], med["loopback"], strict=True)]
    same = max(abs(a - b) / abs(a) for a, b in zip(losses["local"], losses["loopback"], strict=True))
    print()
    print(f"{'mode':>9} | step ms, median (min..max) over repeats")
    for mode, xs in med.items():
        print(f"{mode:>9} | {spread(xs)}")
    print(f"loopback / local per repeat: {spread(ratio, '{:.3f}')}; of the medians: "
          f"{statistics.median(med['loopback']) / statistics.median(med['local']):.3f} (goal <= 1.10)")
    for mode, xs in pooled.items():
        q1, q2, q3 = statistics.quantiles(xs, n=4)
        print(f"{mode:>9} | every step but each run's first ({len(xs)}): median {q2:.1f}, quartiles "
              f"{q1:.1f}..{q3:.1f}, min {min(xs):.1f}")
    lb, lo = pooled["loopback"], pooled["local"]
    print(f"loopback / local, pooled steps: median {statistics.median(lb) / statistics.median(lo):.3f}, "
          f"min {min(lb) / min(lo):.3f} (goal <= 1.10)")
    print(f"largest relative loss difference loopback vs local: {same:.2e}")


if __name__ == "__main__":
    main()
