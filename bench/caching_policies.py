"""Edge caching policies in replay mode: block-aware placement vs whole-model LRU, the greedy vs the MILP
optimum, the bytes a handover moves, and replay speed at 1,000 models x 20 edges x 100,000 requests.

Usage: .venv/bin/python bench/caching_policies.py [--seeds 5] [--repeats 3] [--quick]
       [--only hit,milp,handover,speed] [--catalogue DIR]

Catalogues are sizes-only (``synthetic_catalogue``): the SmolLM2-135M layout with the block sizes the
real build writes (to within the safetensors headers); every variant is generated.  ``--catalogue DIR``
runs the first part on a built catalogue instead (``testbed catalogue build``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from testbed.apps.caching.analytic import cache_network
from testbed.apps.caching.catalogue import load_catalogue, synthetic_catalogue
from testbed.apps.caching.policies import greedy_placement, milp_placement, placement_value, units_of
from testbed.apps.caching.replay import run_replay, workload_for
from testbed.apps.caching.workload import popularity
from testbed.spec.topology import load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[1]
CELLS3 = ROOT / "topologies" / "cells-3.yaml"


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def ring(n: int):
    """n cells, one device and one edge each; edges in a ring (100 Mbit/s, 5 ms), each to the cloud
    (50 Mbit/s, 20 ms)."""
    nodes: dict = {"cloud": {"role": "cloud"}}
    links = []
    for i in range(n):
        nodes[f"e{i}"], nodes[f"d{i}"] = {"role": "edge"}, {"role": "device"}
        links += [
            {"between": [f"d{i}", f"e{i}"], "up": {"bw_mbit": 10, "delay_ms": 10},
             "down": {"bw_mbit": 40, "delay_ms": 10}},
            {"between": [f"e{i}", "cloud"], "up": {"bw_mbit": 50, "delay_ms": 20},
             "down": {"bw_mbit": 50, "delay_ms": 20}},
            {"between": [f"e{i}", f"e{(i + 1) % n}"], "up": {"bw_mbit": 100, "delay_ms": 5},
             "down": {"bw_mbit": 100, "delay_ms": 5}},
        ]
    return parse_topology({"name": f"ring-{n}", "nodes": nodes, "links": links}, ROOT / f"ring-{n}.yaml")


def hit_ratios(seeds: list[int], requests: int, catalogue_dir: str | None) -> None:
    print("\n## block-aware vs whole-model LRU: cells-3, capacity 3 base models, Zipf 0.8, mobility 0.1")
    cat = load_catalogue(catalogue_dir) if catalogue_dir else synthetic_catalogue(40, 8, base="smollm2")
    net = cache_network(load_topology(CELLS3))
    cap = 3 * cat.models[cat.bases()[0]].bytes
    print(f"catalogue: {len(cat.models)} models ({cat.generated_variants()} generated), "
          f"capacity {cap / 1e6:.0f} MB per edge, {requests} requests, seeds {seeds}")
    policies = ["lru", "lfu", "random", "block-lru", "trimcaching", "optimal"]
    res: dict[str, list[dict]] = {p: [] for p in policies}
    for seed in seeds:
        for p in policies:
            res[p].append(run_replay(cat, net, p, cap, zipf=0.8, requests=requests, mobility=0.1, seed=seed))
    print(f"{'policy':12} {'hit ratio':>22} {'byte hit':>22} {'backhaul GB':>22} {'edge-edge GB':>22} "
          f"{'ttft p95 ms':>26}")
    for p in policies:
        r = res[p]
        print(f"{p:12} {spread([x['hit_ratio'] for x in r]):>22} "
              f"{spread([x['byte_hit_ratio'] for x in r]):>22} "
              f"{spread([x['backhaul_bytes'] / 1e9 for x in r]):>22} "
              f"{spread([x['edge_to_edge_bytes'] / 1e9 for x in r]):>22} "
              f"{spread([x['ttft_ms_p95'] for x in r]):>26}")
    for p in ("block-lru", "trimcaching", "optimal"):
        ratio = [a["hit_ratio"] / b["hit_ratio"] for a, b in zip(res[p], res["lru"], strict=True)]
        print(f"{p} / lru hit ratio: {spread(ratio)}  (goal for the greedy: >= 1.5)")


def greedy_vs_milp(seeds: list[int], requests: int) -> None:
    print("\n## greedy vs MILP optimum: 20 models (12 adapters, 6 partial, 2 bases) x 3 edges")
    cat = synthetic_catalogue(12, 6, base="smollm2", seed=1)
    units = units_of(cat)
    net = cache_network(load_topology(CELLS3))
    base = cat.largest_model_bytes()
    print(f"capacity in multiples of the largest model ({base / 1e6:.0f} MB)")
    print(f"{'capacity':>9} {'placement value greedy/opt':>28} {'worst':>7} {'replay hit greedy/opt':>24} "
          f"{'greedy ms':>10} {'milp ms':>9}")
    for factor in (1.0, 1.5, 2.0, 3.0):
        cap = int(base * factor)
        values, hits, t_greedy, t_milp = [], [], [], []
        for seed in seeds:
            pop = popularity(workload_for(cat, net, 0.8, requests, 0.1, seed))
            for p in pop.values():
                t0 = time.perf_counter()
                g = greedy_placement(units, p, cap)
                t1 = time.perf_counter()
                o = milp_placement(units, p, cap)
                t2 = time.perf_counter()
                t_greedy.append((t1 - t0) * 1e3)
                t_milp.append((t2 - t1) * 1e3)
                values.append(placement_value(units, p, g) / placement_value(units, p, o))
            a = run_replay(cat, net, "trimcaching", cap, 0.8, requests, 0.1, seed)
            b = run_replay(cat, net, "optimal", cap, 0.8, requests, 0.1, seed)
            hits.append(a["hit_ratio"] / b["hit_ratio"])
        print(f"{factor:8.1f}x {spread(values):>28} {min(values):7.3f} {spread(hits):>24} "
              f"{statistics.median(t_greedy):10.2f} {statistics.median(t_milp):9.1f}")
    print("(placement value: the share of each edge's true request probability its placement covers; "
          f"{len(seeds)} seeds x 3 edges per row; goal: within 5%, i.e. >= 0.95)")


def handover_bytes() -> None:
    print("\n## a handover that needs only an adapter vs whole-model delivery (SmolLM2 layout)")
    cat = synthetic_catalogue(40, 8, base="smollm2", seed=1)
    ratios = []
    for m in cat.models.values():
        if m.kind == "lora":
            own = sum(b.bytes for b in m.blocks if b.part == "adapter")
            ratios.append(m.bytes / own)
    r = np.array(ratios)
    print(f"40 adapters: whole model / adapter bytes: min {r.min():.0f}x, median {np.median(r):.0f}x, "
          f"max {r.max():.0f}x; >= 50x for {int((r >= 50).sum())} of {len(r)} (goal >= 50x)")


def speed(repeats: int, requests: int, edges: int, adapters: int) -> None:
    print(f"\n## replay speed: {adapters + 100} models x {edges} edges x {requests} requests")
    t0 = time.perf_counter()
    cat = synthetic_catalogue(adapters, 98, base="smollm2", seed=1)
    net = cache_network(ring(edges))
    print(f"catalogue + network: {time.perf_counter() - t0:.1f} s; {len(cat.models)} models")
    cap = 3 * cat.models[cat.bases()[0]].bytes
    print(f"{'policy':12} {'wall s (median, min-max)':>26} {'hit ratio':>10}")
    for p in ("lru", "block-lru", "trimcaching"):
        walls, hit = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run_replay(cat, net, p, cap, 0.8, requests, 0.1, 1, window=1000)
            walls.append(time.perf_counter() - t0)
            hit = out["hit_ratio"]
        print(f"{p:12} {spread(walls):>26} {hit:10.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--only", default="hit,milp,handover,speed")
    ap.add_argument("--catalogue", default=None)
    args = ap.parse_args()
    seeds = list(range(1, args.seeds + 1))
    only = set(args.only.split(","))
    q = args.quick
    if "hit" in only:
        hit_ratios(seeds, 2000 if q else 10_000, args.catalogue)
    if "milp" in only:
        greedy_vs_milp(seeds, 2000 if q else 5_000)
    if "handover" in only:
        handover_bytes()
    if "speed" in only:
        speed(1 if q else args.repeats, 5_000 if q else 100_000, 20, 100 if q else 900)


if __name__ == "__main__":
    main()
