"""KV-cache memory budget of a shard node: latency and cache hits / evictions / rebuilds vs the budget
(``kv_budget_mb``), the number of concurrent users, and the int8 KV cache (``kv_int8``).

SmolLM2-135M split 0:10 (each user's own first shard, in this process) | 10:30 on one shard node
(a real program over loopback) that serves every user's session.  Each user is a thread with its own
client and prompt, all generating at once; a session holds about 31 KB of KV per token on the node
(20 layers x 2 x 3 KV heads x 64 x 4 bytes) in fp32.  Per point: median and p95 of the per-token
latency, the node's hits / evictions / rebuilds, and the fraction of tokens equal to the fp32,
unlimited run's (greedy decoding, same prompt).

    .venv/bin/python bench/kv_budget.py [--repeats 3] [--tokens 32] [--users 1,4] [--budgets 0,4,1]
"""

from __future__ import annotations

import testbed.omp as omp  # isort: skip  (first: the OpenMP wait policy is fixed when torch loads)

import argparse
import dataclasses
import statistics
import tempfile
import threading
from pathlib import Path

import torch
import zmq

from testbed.apps.inference.local_chain import free_port
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import shard_program
from testbed.apps.inference.shard_server import PING_KV_COUNTS
from testbed.apps.inference.split_client import SplitClient
from testbed.apps.launch import Launcher, LocalHost
from testbed.model.loading import default_model_dir, format_prompt, load_tokenizer
from testbed.model.shard import Shard
from testbed.wire.message import Kind, Message, parse

PROMPTS = ["Explain in two sentences why the sky is blue.", "Write a haiku about the sea.",
           "What is a KV cache in a transformer?", "List three uses of edge computing.",
           "Why do mobile networks hand over between cells?", "Describe a split neural network.",
           "What limits the memory of an edge server?", "Summarize how TCP congestion control works."]
STAGES = [Stage("phone", 0, 10), Stage("mec", 10, 30)]


def counters(addr: str) -> list[int]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    try:
        sock.send_multipart(Message(Kind.PING, 0, 0, PING_KV_COUNTS).frames())
        if not sock.poll(10_000):
            raise RuntimeError("no PONG")
        return parse(sock.recv_multipart()).tensor().tolist()
    finally:
        sock.close(0)


def users_round(first: Shard, addr: str, prompts: list[torch.Tensor], tokens: int) -> list[dict]:
    out: list[dict | None] = [None] * len(prompts)

    def user(i: int) -> None:
        client = SplitClient(first, addr, layers=[s.layers for s in STAGES], timeout_s=300)
        try:
            client.connect()
            out[i] = client.generate(prompts[i], tokens, set())
        finally:
            client.close()

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for o in out if o is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--users", default="1,4")
    ap.add_argument("--budgets", default="0,4,1", help="MiB; 0: unlimited")
    args = ap.parse_args()
    omp.apply()
    torch.set_num_threads(1)
    model = default_model_dir()
    tok = load_tokenizer(model)
    users = [int(u) for u in args.users.split(",")]
    prompts = [torch.tensor([format_prompt(tok, p)]) for p in PROMPTS[:max(users)]]
    first = Shard.load(model, 0, 10)
    reference: dict[int, list[int]] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for int8 in (False, True):
            for budget in [int(b) for b in args.budgets.split(",")]:
                addr = f"tcp://127.0.0.1:{free_port()}"
                prog = shard_program(LocalHost("mec"), STAGES[1], addr, None, model, "none", threads=1)
                prog = dataclasses.replace(prog, settings=dataclasses.replace(
                    prog.settings, kv_budget_mb=budget or None, kv_int8=int8))
                with Launcher(Path(tmp) / f"{int8}-{budget}", sharers=2) as run:
                    run.wait_ready(run.start([prog]), 300)
                    for n in users:
                        base = counters(addr)
                        lat: list[float] = []
                        same = total = rebuilt = 0
                        for _ in range(args.repeats):
                            for i, res in enumerate(users_round(first, addr, prompts[:n], args.tokens)):
                                lat += res["token_ms"][1:]
                                rebuilt += res["kv_rebuilds"]
                                ref = reference.setdefault(i, res["tokens"]) if not int8 and not budget \
                                    else reference.get(i, res["tokens"])
                                same += sum(a == b for a, b in zip(res["tokens"], ref, strict=False))
                                total += len(ref)
                        c = [a - b for a, b in zip(counters(addr), base, strict=True)]
                        lat.sort()
                        row = {"int8": int8, "budget_mb": budget or "none", "users": n,
                               "median_ms": statistics.median(lat), "p95_ms": lat[int(0.95 * (len(lat) - 1))],
                               "hits": c[4], "evictions": c[5], "rebuilds": c[6], "client_rebuilds": rebuilt,
                               "agreement": same / max(1, total)}
                        rows.append(row)
                        print(row, flush=True)
    print(f"\n{args.repeats} rounds x {args.tokens} tokens per user; latency per token after the first\n")
    print("| KV cache | budget MiB | users | median ms | p95 ms | hits | evictions | rebuilds | "
          "tokens equal to fp32/unlimited |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'int8' if r['int8'] else 'fp32'} | {r['budget_mb']} | {r['users']} | "
              f"{r['median_ms']:.1f} | {r['p95_ms']:.1f} | {r['hits']} | {r['evictions']} | "
              f"{r['rebuilds']} | {r['agreement']:.3f} |")


if __name__ == "__main__":
    main()
