"""Soak: many concurrent sessions against one edge for a long run; the edge must stay flat.

One shard node (the edge, a separate process started by the launcher) serves every layer but the
first; ``--sessions`` client threads each run requests back to back, every request a new session
(its own socket, KV cache on the edge, CLOSE at the end) with a random prompt.  Every
``--sample-s`` the edge's resident memory, open file descriptors and threads are read from /proc.

Pass criteria (printed, and the exit code): RSS grows <= 5 % and open fds and threads do not grow
(median of the last minute vs median of the first minute after the warm-up), no failed request.
Latency percentiles (request and per token) are printed per minute.

    .venv/bin/python bench/soak.py [--minutes 10] [--sessions 8] [--tokens 16] [--model tiny|default|DIR]
                                   [--security none|curve] [--json OUT]
"""

from __future__ import annotations

import testbed.omp as omp  # isort: skip  (first: the OpenMP wait policy is fixed when torch loads)

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from testbed.apps.inference.local_chain import READY_TIMEOUT_S, free_port
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import shard_program
from testbed.apps.inference.split_client import SplitClient, SplitError
from testbed.apps.launch import Launcher, LocalHost
from testbed.model.loading import default_model_dir
from testbed.model.shard import Shard, load_config
from testbed.model.tiny import make_tiny_model_dir
from testbed.wire import security

RSS_GROWTH_MAX = 0.05


@dataclass
class Sample:
    t: float
    rss_kb: int
    fds: int
    threads: int


@dataclass
class Request:
    t_end: float
    ok: bool
    total_ms: float = 0.0
    tpot_ms: float = 0.0
    error: str = ""


@dataclass
class Soak:
    requests: list[Request] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def proc_sample(pid: int, t: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    return Sample(t, rss, len(os.listdir(f"/proc/{pid}/fd")), threads)


def client_loop(soak: Soak, first: Shard, addr: str, layers: list[str], tokens: int, vocab: int,
                keys: str | None, seed: int, t0: float) -> None:
    rng = random.Random(seed)
    ctx = security.context(keys)
    try:
        while not soak.stop.is_set():
            ids = torch.tensor([[rng.randrange(vocab) for _ in range(rng.randint(4, 48))]])
            client = SplitClient(first, addr, layers=layers, timeout_s=60, ctx=ctx)
            try:
                out = client.generate(ids, tokens, stop_ids=set())
                req = Request(time.monotonic() - t0, True, out["total_ms"], out["tpot_ms"])
            except SplitError as e:
                req = Request(time.monotonic() - t0, False, error=str(e))
            finally:
                client.close()
            with soak.lock:
                soak.requests.append(req)
    finally:
        if keys is not None:
            ctx.term()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def report(soak: Soak, minutes: float, warmup_min: float) -> tuple[dict, bool]:
    rows = []
    for m in range(int(minutes + 0.999)):
        reqs = [r for r in soak.requests if m * 60 <= r.t_end < (m + 1) * 60]
        smp = [s for s in soak.samples if m * 60 <= s.t < (m + 1) * 60]
        ok = [r for r in reqs if r.ok]
        rows.append({
            "minute": m + 1, "requests": len(reqs), "failed": len(reqs) - len(ok),
            "p50_ms": pct([r.total_ms for r in ok], 50), "p95_ms": pct([r.total_ms for r in ok], 95),
            "p99_ms": pct([r.total_ms for r in ok], 99),
            "tpot_p50_ms": pct([r.tpot_ms for r in ok], 50), "tpot_p99_ms": pct([r.tpot_ms for r in ok], 99),
            "rss_mb": round(statistics.median([s.rss_kb for s in smp]) / 1024, 1) if smp else float("nan"),
            "fds_max": max((s.fds for s in smp), default=0),
            "threads_max": max((s.threads for s in smp), default=0),
        })
    # the first minute after the warm-up against the last minute of the run, each by its median: a
    # leak is a trend; a sample that lands while a session's connection opens is not one
    after = [s for s in soak.samples if s.t >= warmup_min * 60]
    first = [s for s in after if s.t < warmup_min * 60 + 60]
    last = [s for s in after if s.t >= after[-1].t - 60] if after else []

    def med(xs: list[Sample], key: str) -> float:
        return statistics.median(getattr(s, key) for s in xs) if xs else float("nan")

    growth = med(last, "rss_kb") / med(first, "rss_kb") - 1 if first and last else float("nan")
    failed = sum(not r.ok for r in soak.requests)
    verdict = {
        "requests": len(soak.requests), "failed": failed,
        "rss_growth_pct": round(100 * growth, 2),
        "fds": [med(first, "fds"), med(last, "fds")],
        "threads": [med(first, "threads"), med(last, "threads")],
        "errors": sorted({r.error for r in soak.requests if not r.ok})[:5],
    }
    passed = (failed == 0 and growth <= RSS_GROWTH_MAX
              and verdict["fds"][1] <= verdict["fds"][0] and verdict["threads"][1] <= verdict["threads"][0])
    samples = [dataclasses.asdict(s) for s in soak.samples]
    return {"minutes": rows, "verdict": verdict, "passed": passed, "samples": samples}, passed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup-minutes", type=float, default=None,
                    help="default: 1, or a fifth of a shorter run")
    ap.add_argument("--sessions", type=int, default=8, help="client threads, each one session at a time")
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--model", default="tiny", help="tiny (built from code) | default (SmolLM2-135M) | DIR")
    ap.add_argument("--security", choices=("none", "curve"), default="none")
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--json", type=Path, help="write the per-minute table and verdict here")
    args = ap.parse_args()
    warmup = args.warmup_minutes if args.warmup_minutes is not None else min(1.0, args.minutes / 5)
    os.environ.setdefault(omp.ENV_VAR, omp.policy_name())
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    if args.model == "tiny":
        model = make_tiny_model_dir(work / "tiny", n_layers=4, hidden=64)
    else:
        model = default_model_dir() if args.model == "default" else Path(args.model)
    cfg = load_config(model)
    layers, vocab = int(cfg.num_hidden_layers), int(cfg.vocab_size)
    stages = [Stage("device", 0, 1), Stage("edge", 1, layers)]
    node_keys, device_keys = security.run_key_files(args.security, work / "run")
    first = Shard.load(model, 0, 1, threads=1)
    first.eval()
    addr = f"tcp://127.0.0.1:{free_port()}"
    edge = shard_program(LocalHost("edge"), stages[1], addr, None, model, "none", idle_timeout_s=30.0,
                         threads=1, curve_keys=node_keys)
    soak = Soak()
    print(f"soak: {args.sessions} sessions x {args.tokens} tokens against one edge ({model.name}, layers "
          f"1:{layers}, security {args.security}) for {args.minutes:g} min, warm-up {warmup:g} min; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    with Launcher(work / "logs", sharers=2) as run:
        (node,) = run.start([edge])
        run.wait_ready([node], READY_TIMEOUT_S)
        t0 = time.monotonic()
        threads = [threading.Thread(target=client_loop, daemon=True,
                                    args=(soak, first, addr, [s.layers for s in stages], args.tokens, vocab,
                                          device_keys, i, t0)) for i in range(args.sessions)]
        for t in threads:
            t.start()
        next_print = 60.0
        while (now := time.monotonic() - t0) < args.minutes * 60:
            run.check()  # the edge died: ProgramFailed
            soak.samples.append(proc_sample(node.pid, now))
            if now >= next_print:
                s = soak.samples[-1]
                with soak.lock:
                    n, bad = len(soak.requests), sum(not r.ok for r in soak.requests)
                print(f"  {now / 60:4.1f} min: {n} requests, {bad} failed, edge RSS "
                      f"{s.rss_kb / 1024:.1f} MB, {s.fds} fds, {s.threads} threads", flush=True)
                next_print += 60
            time.sleep(args.sample_s)
        soak.stop.set()
        for t in threads:
            t.join(120)
        soak.samples.append(proc_sample(node.pid, time.monotonic() - t0))
    out, passed = report(soak, args.minutes, warmup)
    print("minute  requests  failed  p50 ms  p95 ms  p99 ms  tpot p50  tpot p99  RSS MB  fds  threads")
    for r in out["minutes"]:
        print(f"{r['minute']:6}  {r['requests']:8}  {r['failed']:6}  {r['p50_ms']:6.1f}  {r['p95_ms']:6.1f}  "
              f"{r['p99_ms']:6.1f}  {r['tpot_p50_ms']:8.2f}  {r['tpot_p99_ms']:8.2f}  {r['rss_mb']:6.1f}  "
              f"{r['fds_max']:3}  {r['threads_max']:7}")
    print(json.dumps(out["verdict"]))
    print(f"{'PASS' if passed else 'FAIL'}: RSS growth {out['verdict']['rss_growth_pct']} % after warm-up "
          f"(<= {RSS_GROWTH_MAX * 100:g} %), fds {out['verdict']['fds']}, "
          f"threads {out['verdict']['threads']} "
          f"(medians: first minute after warm-up, last minute), {out['verdict']['failed']} failed of "
          f"{out['verdict']['requests']}; "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
