"""Compression of split training's wire: int8 activations + int8 activation gradients vs fp32.

One client on loopback, the same seed, data and steps: bytes per step (both directions) and the held-out
perplexity after training (the corpus's last 10%), fp32 and int8/int8 side by side; goal: >= 3.5x fewer
bytes with perplexity within 2% of fp32's.  The bytes are exact figures of the run; the perplexity of a
seeded run is repeated to show it does not move between repeats (threads do not change the sums here).
The recipe: rank 8, alpha 16, every linear of a block, AdamW lr 1e-3 (``defaults.py``), batch x seq
tokens per step, the codecs of ``testbed.model.codecs`` (int8: per-row absmax scale).

    .venv/bin/python bench/train_compression.py [--model default|tiny:N] [--cut 4] [--steps 10]
                                                [--repeats 3] [--data fortunes:songs-poems]
"""

from __future__ import annotations

import testbed.omp  # noqa: F401  # isort: skip  (first: the OpenMP wait policy is fixed when torch loads)

import argparse
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from train_common import model_dir, options, spread, train

from testbed.apps.training.run import model_layers

CODECS = (("fp32", "fp32"), ("int8", "int8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--cut", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--data", default="")
    args = ap.parse_args()
    figures: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as work:
        model = model_dir(args.model, Path(work))
        layers = model_layers(model)
        placement = f"dev=0:{args.cut},mec={args.cut}:{layers}"
        base = replace(options(steps=args.steps, batch=args.batch, seq=args.seq), evaluate=True,
                       data=[d for d in args.data.split(",") if d])
        print(f"model {args.model}, placement {placement}, {args.steps} steps of {args.batch} x {args.seq}, "
              f"loopback, {args.repeats} repeats; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        for r in range(args.repeats):
            for codec, grad in CODECS:
                res = train(model, placement, replace(base, codec=codec, grad_codec=grad), "loopback")
                f = figures.setdefault(f"{codec}/{grad}", {"bytes": [], "ppl": [], "before": [], "step": []})
                f["bytes"].append(res["bytes_up_per_step"] + res["bytes_down_per_step"])
                f["ppl"].append(res["eval_ppl_after"])
                f["before"].append(res["eval_ppl_before"])
                f["step"].append(res["step_ms_p50"])
                print(f"  repeat {r} {codec}/{grad}: {f['bytes'][-1]:.0f} B/step, ppl "
                      f"{res['eval_ppl_before']} -> {res['eval_ppl_after']}, "
                      f"step {res['step_ms_p50']:.0f} ms", flush=True)
    print()
    print(f"{'codecs':>9} | bytes/step (up+down) | ppl before | ppl after, median (min..max) | step ms")
    for name, f in figures.items():
        print(f"{name:>9} | {statistics.median(f['bytes']):>20.0f} | "
              f"{statistics.median(f['before']):>10.3f} | {spread(f['ppl'], '{:.3f}'):>28} | "
              f"{spread(f['step'], '{:.0f}')}")
    fp, q = figures["fp32/fp32"], figures["int8/int8"]
    cut = statistics.median(fp["bytes"]) / statistics.median(q["bytes"])
    print(f"bytes fp32 / int8: {cut:.2f}x (goal >= 3.5x)")
    print(f"ppl int8 / fp32 - 1: {statistics.median(q['ppl']) / statistics.median(fp['ppl']) - 1:+.2%} "
          "(goal within 2%)")


if __name__ == "__main__":
    main()
