"""Recovery of split inference from a failed stage: detection time and added latency vs their bounds.

SmolLM2-135M split 0:10 (this process, the device) | 10:20 on mec with a standby mec2 | 20:30 on
cloud; shard nodes are real programs over loopback.  Mid-generation (after ``--at`` tokens) mec's
program is either SIGKILLed (``kill``: its connection drops) or SIGSTOPped (``hang``: nothing drops,
only the step's deadline can tell).  Per run:

- detection: from the fault (or from the step's request, if the fault came before it) to the client
  declaring the stage failed, vs the bound
  2 x the step time measured before the fault + 1 RTT (the floor of 50 ms applies); the step time
  is the whole step as the client sees it (a stage's own is unknown to it until it fails);
- added latency of the token that met the fault (its time minus the median step) vs detection +
  one re-prefill of the session's tokens (the record's ``rebuild_ms``).

    .venv/bin/python bench/recovery.py [--repeats 3] [--tokens 40] [--at 20] [--modes kill,hang]
"""

from __future__ import annotations

import testbed.omp as omp  # isort: skip  (first: the OpenMP wait policy is fixed when torch loads)

import argparse
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from testbed.apps.inference.local_chain import free_port
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import shard_programs
from testbed.apps.inference.split_client import SplitClient
from testbed.apps.launch import Launcher, LocalHost
from testbed.model.loading import default_model_dir, format_prompt, load_tokenizer
from testbed.model.shard import Shard

PROMPT = "Explain in two sentences why the sky is blue."
STAGES = [Stage("phone", 0, 10), Stage("mec", 10, 20, ("mec2",)), Stage("cloud", 20, 30)]


def one_run(model: Path, ids: torch.Tensor, first: Shard, mode: str, tokens: int, at: int,
            logs: Path) -> dict:
    addrs = [None, f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"]
    sb = [[], [f"tcp://127.0.0.1:{free_port()}"], []]
    progs = shard_programs(STAGES, addrs, lambda n: LocalHost(n), model, "none", standby_addrs=sb, threads=1)
    with Launcher(logs, sharers=4) as run:
        nodes = run.start(progs)
        run.wait_ready(nodes, 300)
        victim = next(r for r in nodes if r.program.host.name == "mec")
        client = SplitClient(first, addrs[1], layers=[s.layers for s in STAGES], timeout_s=120,
                             next_standbys=sb[1], routes=[s.nodes for s in STAGES])
        client.connect()
        fault: list[float] = []

        def inject() -> None:
            while len(getattr(client, "partial", {}).get("tokens", [])) < at:
                time.sleep(0.001)
            os.kill(victim.pid, signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
            fault.append(time.monotonic())

        t = threading.Thread(target=inject, daemon=True)
        t.start()
        res = client.generate(ids, tokens, set())
        client.close()
        if mode == "hang":
            os.kill(victim.pid, signal.SIGKILL)
    (rec,) = res["recoveries"]
    before = res["token_ms"][1:at]
    step = statistics.median(before)
    k = max(range(at, len(res["token_ms"])), key=lambda i: res["token_ms"][i])
    # from the fault, or from the request's send if the fault came first (the device computes its
    # own layers before it sends: that time is no part of noticing the failure)
    detect = min((rec["detected_at_s"] - fault[0]) * 1e3, rec["detect_ms"])
    bound = max(client.floor_ms, 2 * step + client.clock.rtt_ms)
    added = res["token_ms"][k] - step
    return {"mode": mode, "step_ms": step, "rtt_ms": client.clock.rtt_ms, "detect_ms": detect,
            "detect_bound_ms": bound, "added_ms": added, "rebuild_ms": rec["rebuild_ms"],
            "added_bound_ms": detect + rec["rebuild_ms"], "why": rec["why"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--at", type=int, default=20)
    ap.add_argument("--modes", default="kill,hang")
    args = ap.parse_args()
    omp.apply()
    torch.set_num_threads(1)
    model = default_model_dir()
    tok = load_tokenizer(model)
    ids = torch.tensor([format_prompt(tok, PROMPT)])
    first = Shard.load(model, 0, 10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            for r in range(args.repeats):
                row = one_run(model, ids, first, mode, args.tokens, args.at, Path(tmp) / f"{mode}{r}")
                rows.append(row)
                print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    print(f"\nprompt {ids.shape[1]} tokens, fault after {args.at} of {args.tokens}; medians (min-max) "
          f"of {args.repeats} runs\n")
    print("| fault | step ms | RTT ms | detection ms | bound ms | detect/bound | added ms | "
          "detect + re-prefill ms | added/(detect+re-prefill) |")
    print("|---|---|---|---|---|---|---|---|---|")

    def col(xs: list[float]) -> str:
        return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"

    for mode in args.modes.split(","):
        rs = [r for r in rows if r["mode"] == mode]
        print(f"| {mode} | {col([r['step_ms'] for r in rs])} | {col([r['rtt_ms'] for r in rs])} | "
              f"{col([r['detect_ms'] for r in rs])} | {col([r['detect_bound_ms'] for r in rs])} | "
              f"{col([r['detect_ms'] / r['detect_bound_ms'] for r in rs])} | "
              f"{col([r['added_ms'] for r in rs])} | "
              f"{col([r['added_bound_ms'] for r in rs])} | "
              f"{col([r['added_ms'] / r['added_bound_ms'] for r in rs])} |")


if __name__ == "__main__":
    main()
