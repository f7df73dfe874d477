"""Docker runtime figures: image build (cold/warm), image size, container start + attach per
node, bring-up time vs process hosts, and per-token latency of one split inference on docker vs
process hosts (measured side by side, alternating, same limits on both).

Usage (root): .venv/bin/python bench/runtime_docker.py [--cold] [--rounds 3] [--tokens 16]
``--cold`` also times a build from scratch (debootstrap into a temporary cache: ~1 min, uses
the apt mirror).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.hosts import images  # noqa: E402
from testbed.net.network import EmulatedNetwork  # noqa: E402
from testbed.spec.topology import load_topology  # noqa: E402

PAIR = """name: bench-pair
nodes:
  phone: {role: device, cpu: 1.0, memory_mb: 2048}
  mec:   {role: edge, cpu: 2.0, memory_mb: 4096}
links:
  - between: [phone, mec]
    up:   {bw_mbit: 50}
    down: {bw_mbit: 50}
"""


def star(n: int) -> str:
    nodes = "".join(f"  d{i}: {{role: device, cpu: 0.5}}\n" for i in range(n - 1))
    links = "".join(f"  - between: [d{i}, cell]\n" for i in range(n - 1))
    return (f"name: bench-star\nnodes:\n  cell: {{role: cell}}\n{nodes}  edge: {{role: edge}}\n"
            f"links:\n{links}  - between: [edge, cell]\n")


def bench_image(cold: bool) -> list[str]:
    rows = []
    if cold:
        with tempfile.TemporaryDirectory(prefix="edgellm-cold-") as d:
            r = images.ensure_image(force=True, cache_dir=Path(d))
            rows.append(f"| cold build (debootstrap + import + Dockerfile) | {r.seconds:.1f} s |")
    r = images.ensure_image(force=True)
    rows.append(f"| forced rebuild from the cached rootfs | {r.seconds:.1f} s |")
    r = images.ensure_image()
    rows.append(f"| warm (inputs unchanged, reused by hash) | {r.seconds * 1000:.0f} ms |")
    rows.append(f"| image size | {r.size_bytes / 1e6:.0f} MB |")
    rootfs = images.rootfs_tarball(images.packages())
    rows.append(f"| cached rootfs tarball | {rootfs.stat().st_size / 1e6:.0f} MB |")
    return rows


def bench_bringup(tmp: Path, n: int) -> list[str]:
    f = tmp / "star.yaml"
    f.write_text(star(n))
    topo = load_topology(f)
    rows = []
    for runtime in ("process", "docker"):
        t0 = time.monotonic()
        with EmulatedNetwork(topo, shaper="kernel", runtime=runtime) as net:
            up = time.monotonic() - t0
            ok = " 0% packet loss" in net.cmd("d0", ["ping", "-c", "1", net.ip("edge", "d0")])
            hosts = [net.mn.nameToNode[h.name] for h in topo.hosts()]
            t1 = time.monotonic()
        down = time.monotonic() - t1
        extra = ""
        if runtime == "docker":
            start = statistics.median(h.start_s for h in hosts)
            attach = statistics.median(h.attach_s for h in hosts)
            extra = f"container start {start:.2f} s + shell attach {attach * 1000:.0f} ms per node (median)"
        rows.append(f"| {runtime} | {n} | {up:.1f} | {down:.1f} | {'ok' if ok else 'FAIL'} | {extra} |")
    return rows


def bench_inference(tmp: Path, rounds: int, tokens: int) -> list[str]:
    from testbed.apps.inference.placement import parse_placement
    from testbed.apps.inference.run import model_layers, run_on_network
    from testbed.model.loading import prepare_model_dir

    f = tmp / "pair.yaml"
    f.write_text(PAIR)
    topo = load_topology(f)
    model_dir = prepare_model_dir(None)
    stages = parse_placement("phone=0:10,mec=10:30", topo, model_layers(model_dir))
    prompt = "Mobile edge computing moves inference close to the user because"
    tpot: dict[str, list[float]] = {"process": [], "docker": []}
    ttft: dict[str, list[float]] = {"process": [], "docker": []}
    toks: dict[str, list[int]] = {}
    with EmulatedNetwork(topo, shaper="kernel", runtime="process") as pnet, \
            EmulatedNetwork(topo, shaper="kernel", runtime="docker") as dnet:
        for _ in range(rounds):
            for runtime, net in (("process", pnet), ("docker", dnet)):
                r = run_on_network(net, stages, model_dir, prompt, tokens, "none", "fp32", True)
                tpot[runtime].append(r["tpot_ms"])
                ttft[runtime].append(r["ttft_ms"])
                if toks.setdefault(runtime, r["tokens"]) != r["tokens"]:
                    raise SystemExit(f"{runtime}: tokens changed between rounds")
    same = toks["process"] == toks["docker"]
    rows = []
    for runtime in ("process", "docker"):
        med_ttft, med_tpot = statistics.median(ttft[runtime]), statistics.median(tpot[runtime])
        per_round = " ".join(f"{x:.0f}" for x in tpot[runtime])
        rows.append(f"| {runtime} | {med_ttft:.0f} | {med_tpot:.1f} | {per_round} |")
    ratio = statistics.median(tpot["docker"]) / statistics.median(tpot["process"])
    rows.append(f"\nmedian TPOT docker / process = {ratio:.3f} (goal <= 1.05); tokens identical: {same}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--skip-inference", action="store_true")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    print("\n| image | figure |\n|---|---|")
    print("\n".join(bench_image(args.cold)), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-docker-") as d:
        print("\n| runtime | nodes | bring-up s | teardown s | ping | per node |\n|---|---|---|---|---|---|")
        print("\n".join(bench_bringup(Path(d), args.nodes)), flush=True)
        if not args.skip_inference:
            print("\n| runtime | TTFT ms (median) | TPOT ms (median) | TPOT per round |\n|---|---|---|---|")
            print("\n".join(bench_inference(Path(d), args.rounds, args.tokens)))
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
