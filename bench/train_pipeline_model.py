"""Pipeline model: measured step time vs the analytic ``predicted_step_ms`` for 1-4 hops, M micro-batches
and both schedules; 1F1B's peak activation memory per stage vs GPipe's.

Every stage is a process on loopback (no link limits: the prediction's transfer terms are the message
sizes over an unshaped link, so it is stage compute + bubble).  For each (hops, M, schedule) the run is
repeated; the table gives the median (min..max) of measured/predicted over the repeats (goal: within
15%), and for M > P the largest 1F1B/GPipe ratio of peak activation bytes over the stages against the
bound P/M (+10%).  On a machine with fewer cores than stages the stages cannot overlap, so the measured
time is near the sum of the stages' compute, not the pipelined bound: read the ratio with that in mind.

    .venv/bin/python bench/train_pipeline_model.py [--model tiny:8|default] [--hops 1,2,3,4]
                                                   [--micro 1,2,4,8] [--steps 3] [--repeats 3]
"""

from __future__ import annotations

import testbed.omp  # noqa: F401  # isort: skip  (first: the OpenMP wait policy is fixed when torch loads)

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from train_common import even_placement, model_dir, options, spread, train

from testbed.apps.training.run import model_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:8")
    ap.add_argument("--hops", default="1,2,3,4")
    ap.add_argument("--micro", default="1,2,4,8")
    ap.add_argument("--schedules", default="gpipe,1f1b")
    ap.add_argument("--device-layers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    hops_list = [int(x) for x in args.hops.split(",")]
    micro = [int(x) for x in args.micro.split(",")]
    schedules = args.schedules.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        model = model_dir(args.model, Path(work))
        layers = model_layers(model)
        print(f"model {args.model} ({layers} layers), {args.steps} steps of {args.batch} x {args.seq}, "
              f"loopback, {args.repeats} repeats; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        for hops in hops_list:
            placement = even_placement(layers, args.device_layers, hops)
            for m in micro:
                peaks: dict[str, list[int]] = {}
                for schedule in schedules:
                    ratio, meas, pred = [], [], []
                    for _ in range(args.repeats):
                        opt = options(steps=args.steps, batch=args.batch, seq=args.seq, micro_batches=m,
                                      schedule=schedule)
                        res = train(model, placement, opt, "loopback")
                        meas.append(res["step_ms_p50"])
                        pred.append(res["predicted_step_ms"])
                        ratio.append(res["step_ms_p50"] / res["predicted_step_ms"])
                        peaks[schedule] = [h["peak_act_bytes"] for h in res["per_hop"]]
                    rows.append((hops, m, schedule, meas, pred, ratio))
                    print(f"  hops {hops} M={m} {schedule:>5}: measured {spread(meas)} ms, predicted "
                          f"{spread(pred)} ms, ratio {spread(ratio, '{:.2f}')}; peak activations "
                          f"{peaks[schedule]}", flush=True)
                p = hops + 1
                if m > p and {"gpipe", "1f1b"} <= set(peaks):
                    worst = max(b / a for a, b in zip(peaks["gpipe"], peaks["1f1b"], strict=True) if a)
                    print(f"    1F1B/GPipe peak activations, worst stage: {worst:.2f} "
                          f"(bound P/M + 10% = {p / m * 1.1:.2f})", flush=True)
    print()
    print("hops   M  schedule | measured ms          | predicted ms         | measured/predicted")
    for hops, m, schedule, meas, pred, ratio in rows:
        print(f"{hops:>4} {m:>3}  {schedule:>8} | {spread(meas):>20} | {spread(pred):>20} | "
              f"{spread(ratio, '{:.2f}')}")
    inside = sum(abs(statistics.median(r[5]) - 1) <= 0.15 for r in rows)
    print(f"{inside}/{len(rows)} configurations within 15% of the prediction")


if __name__ == "__main__":
    main()
