"""Cost of ``security: curve`` (CurveZMQ) per generated token, side by side with plain ZeroMQ.

The split-inference quick point (``experiments/quick.yaml``'s split: SmolLM2-135M, the phone holds
layers 0:4, the edge 4:30, fp32 activations, KV cache on), three ways:

1. ``message``: round trip of one token's activation message (1 x 1 x 576 fp32, 2.3 kB) and its
   reply between two sockets of this process, plain vs CurveZMQ: the cryptography's own cost.
2. ``loopback``: per-token time (TPOT) with the edge shard as a separate process on loopback, one
   plain chain and one CurveZMQ chain started once, rounds alternating between them (median, and
   min-max over rounds).  Goal: curve / plain <= 1.05.
3. ``network`` (root): the quick point itself over the emulated topology (uplink 20 Mbit/s),
   ``testbed infer``'s path end to end (keys written by the launcher), rounds alternating.

    .venv/bin/python bench/curve_cost.py [--tokens 32] [--rounds 5] [--network-rounds 3] [--skip-network]
                                         [--only message|loopback|network]
"""

from __future__ import annotations

import testbed.omp as omp  # isort: skip  (first: the OpenMP wait policy is fixed when torch loads)

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import zmq

from testbed.apps.inference.activations import hidden_message
from testbed.apps.inference.local_chain import free_port, loopback_chain
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.split_client import SplitClient
from testbed.model.loading import default_model_dir, format_prompt, load_tokenizer
from testbed.model.shard import Shard, load_config
from testbed.wire import security
from testbed.wire.message import parse, result

PROMPT = "What is the capital of France?"
CUT = 4
MODES = ("plain", "curve")


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def message(rounds: int, n: int = 2000) -> None:
    keys_dir = Path(tempfile.mkdtemp(prefix="curve-bench-"))
    node, device = security.write_run_keys(keys_dir)
    frames = hidden_message(1, 0, 0, torch.randn(1, 1, 576), "fp32", True).frames()
    reply = result(1, 0, 5, []).frames()
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(rounds):
        for mode in MODES:
            sctx = security.context(str(node)) if mode == "curve" else zmq.Context()
            cctx = security.context(str(device)) if mode == "curve" else zmq.Context()
            srv, cli = sctx.socket(zmq.ROUTER), cctx.socket(zmq.DEALER)
            port = free_port()
            srv.bind(f"tcp://127.0.0.1:{port}")
            cli.connect(f"tcp://127.0.0.1:{port}")
            for i in range(n + 100):  # 100 warm-up round trips (the handshake among them)
                if i == 100:
                    t0 = time.perf_counter()
                cli.send_multipart(frames, copy=False)
                peer, *got = srv.recv_multipart()
                parse(got)
                srv.send_multipart([peer, *reply])
                parse(cli.recv_multipart())
            per_mode[mode].append((time.perf_counter() - t0) / n * 1e6)
            srv.close(0)
            cli.close(0)
            sctx.term()
            cctx.term()
    print(f"message round trip, 2.3 kB up / 0.1 kB back, us (median, min-max of {rounds}):")
    for mode in MODES:
        print(f"  {mode:6} {spread(per_mode[mode])}")
    added = statistics.median(per_mode["curve"]) - statistics.median(per_mode["plain"])
    print(f"  added by curve: {added:.1f} us per token")


def loopback(model: Path, tokens: int, rounds: int) -> None:
    os.environ.setdefault(omp.ENV_VAR, omp.policy_name())
    layers = int(load_config(model).num_hidden_layers)
    stages = [Stage("phone", 0, CUT), Stage("mec", CUT, layers)]
    first = Shard.load(model, 0, CUT, threads=1)
    first.eval()
    ids = torch.as_tensor(format_prompt(load_tokenizer(model), PROMPT), dtype=torch.int64).reshape(1, -1)
    keys_dir = Path(tempfile.mkdtemp(prefix="curve-bench-"))
    node, device = security.write_run_keys(keys_dir)
    tpot: dict[str, list[float]] = {m: [] for m in MODES}
    toks: dict[str, list[int]] = {}
    with loopback_chain(model, stages, threads=1, logs=keys_dir / "plain") as plain_addrs, \
            loopback_chain(model, stages, threads=1, logs=keys_dir / "curve",
                           curve_keys=str(node)) as curve_addrs:
        addrs = {"plain": plain_addrs[1], "curve": curve_addrs[1]}
        for r in range(rounds + 1):  # round 0 warms both up
            for mode in (MODES if r % 2 else MODES[::-1]):
                ctx = security.context(str(device)) if mode == "curve" else zmq.Context()
                client = SplitClient(first, addrs[mode], layers=[s.layers for s in stages], ctx=ctx,
                                     timeout_s=120)
                try:
                    client.connect()
                    out = client.generate(ids, tokens, stop_ids=set())
                finally:
                    client.close()
                    ctx.term()
                if r:
                    tpot[mode].append(out["tpot_ms"])
                toks[mode] = out["tokens"]
    assert toks["plain"] == toks["curve"], "curve changed the output"
    print(f"loopback, quick point (phone 0:{CUT} here, mec {CUT}:{layers} a process), {tokens} tokens, "
          f"TPOT ms (median, min-max of {rounds} alternating rounds):")
    for mode in MODES:
        print(f"  {mode:6} {spread(tpot[mode])}")
    print(f"  curve / plain: {statistics.median(tpot['curve']) / statistics.median(tpot['plain']):.3f}"
          f"  (goal <= 1.05); identical tokens: yes")


def network(model: Path, tokens: int, rounds: int) -> None:
    from testbed.apps.inference.run import run_split_inference
    from testbed.spec.topology import parse_topology
    from testbed.spec.yamlfile import load_yaml

    repo = Path(__file__).resolve().parents[1]
    src = repo / "topologies" / "device-edge-cloud.yaml"
    data = load_yaml(src)
    data["links"][0]["up"]["bw_mbit"] = 20  # the quick suite's high-bandwidth point
    layers = int(load_config(model).num_hidden_layers)
    placement = f"phone=0:{CUT},mec={CUT}:{layers}"
    tpot: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}  # CPU ms per token, both programs together
    for r in range(rounds):
        for mode in (MODES if r % 2 else MODES[::-1]):
            topo = parse_topology({**data, "security": "curve" if mode == "curve" else "none"}, src)
            logs = Path(tempfile.mkdtemp(prefix=f"curve-bench-{mode}-"))
            res = run_split_inference(topo, placement, PROMPT, max_new_tokens=tokens, model=model, logs=logs)
            tpot[mode].append(res["tpot_ms"])
            cpu[mode].append(sum(h["cpu_ms"] for h in res["per_hop"]) / len(res["tokens"]))
    print(f"emulated network, quick point ({placement}, uplink 20 Mbit/s), {tokens} tokens, "
          f"TPOT ms (median, min-max of {rounds} alternating rounds):")
    for mode in MODES:
        print(f"  {mode:6} {spread(tpot[mode])}")
    print(f"  curve / plain: {statistics.median(tpot['curve']) / statistics.median(tpot['plain']):.3f}"
          "  (goal <= 1.05)")
    print("  CPU ms per token, driver and shard node together (ready line to stop; load-insensitive):")
    for mode in MODES:
        print(f"  {mode:6} {spread(cpu[mode])}")
    print(f"  curve / plain: {statistics.median(cpu['curve']) / statistics.median(cpu['plain']):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--network-rounds", type=int, default=3)
    ap.add_argument("--only", choices=("message", "loopback", "network"), help="run one part only")
    ap.add_argument("--skip-network", action="store_true")
    args = ap.parse_args()
    model = default_model_dir()
    print(f"load average {os.getloadavg()[0]:.1f} at start")
    if args.only in (None, "message"):
        message(args.rounds)
    if args.only in (None, "loopback"):
        loopback(model, args.tokens, args.rounds)
    if args.only == "network" or (args.only is None and not args.skip_network):
        network(model, args.tokens, args.network_rounds)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
