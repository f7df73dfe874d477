"""Run every benchmark in this folder, one after another (``make bench``; root; ~30-40 min here).

    .venv/bin/python bench/run_all.py [--only NAME,NAME] [--list]

Each benchmark prints its own table; the figures recorded in bench/README.md came from the same
scripts (their commands are given there).  A failing benchmark is reported and the rest still run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> argv after the script path; ordered from cheap to expensive
BENCHES: dict[str, list[str]] = {
    "trace_parse": [],
    "net_scale": [],
    "net_fidelity": [],
    "model_quant": [],
    "llama_anchor": [],
    "omp_wait": [],
    "split_codecs": [],
    "split_overhead": [],
    "runtime_docker": [],
    "caching_policies": [],
    "delivery_goodput": [],
    "serve_adapters": ["--threads", "1", "--clock", "cpu"],
    "train_tokens": [],
    "train_split_overhead": [],
    "train_compression": [],
    "train_pipeline_model": [],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    if args.list:
        print("\n".join(BENCHES))
        return 0
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"bench/run_all.py: --only: unknown benchmark(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *BENCHES[name]])
        print(f"=== {name}: exit {rc} in {time.monotonic() - t0:.0f} s ===", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
