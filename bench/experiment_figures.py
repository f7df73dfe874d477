"""Figures of an experiment run: wall time per point and its phases, measured/predicted ratios.

    .venv/bin/python bench/experiment_figures.py DIR [DIR ...]

Reads DIR/results.jsonl (``testbed run SUITE --out DIR``) and prints one table per directory
plus the totals: the suite's wall time (its budget: quick.yaml < 2 min), how it splits into
network bring-up, workload (shard start-up + generation) and teardown, and the spread of the
measured/predicted end-to-end latency ratio.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from testbed.experiments.results import read_records


def figures(out_dir: Path) -> None:
    recs = read_records(out_dir / "results.jsonl")
    ok = [r for r in recs if r.get("status") == "ok"]
    print(f"\n{out_dir}: {len(recs)} records, {len(ok)} ok")
    print(f"{'point':<48} {'total s':>8} {'net up':>7} {'workload':>8} {'down':>6} {'load':>5} "
          f"{'meas/pred':>9}")
    for r in recs:
        ph = r.get("phases", {})
        ratio = r.get("metrics", {}).get("ratio", {}).get("e2e")
        print(f"{r['point']:<48} {r['duration_s']:>8.1f} {ph.get('network_up_s', 0):>7.2f} "
              f"{ph.get('workload_s', 0):>8.2f} {ph.get('teardown_s', 0):>6.2f} "
              f"{(r.get('loadavg') or [0])[0]:>5.1f} {ratio if ratio is not None else '-':>9}")
    total = sum(r["duration_s"] for r in recs)
    ratios = np.array([r["metrics"]["ratio"]["e2e"] for r in ok if r["metrics"]["ratio"].get("e2e")])
    print(f"total {total:.1f} s over {len(recs)} points ({total / max(1, len(recs)):.1f} s per point)")
    if ratios.size:
        print(f"measured/predicted e2e: median {np.median(ratios):.3f}, min {ratios.min():.3f}, "
              f"max {ratios.max():.3f}")


if __name__ == "__main__":
    for d in sys.argv[1:] or ["results/quick"]:
        figures(Path(d))
