"""Bring-up and teardown time of EmulatedNetwork for 10, 50 and 100 nodes.

Topology: N-1 devices on one cell (a LinuxBridge) plus one edge server; every device link is
rate-shaped (10/40 Mbit/s), the backhaul 1 Gbit/s.  After each teardown the run's devices,
processes, cgroups and state file are checked to be gone.  Usage (root):

    .venv/bin/python bench/net_scale.py [--sizes 10,50,100] [--shaper kernel]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from testbed.net.clean import leftovers
from testbed.net.network import EmulatedNetwork
from testbed.spec.topology import LinkSpec, NodeSpec, Shaping, Topology


def star(n: int) -> Topology:
    nodes = {f"d{i}": NodeSpec(f"d{i}", "device") for i in range(n - 1)}
    nodes |= {"cell": NodeSpec("cell", "cell"), "edge": NodeSpec("edge", "edge")}
    links = [LinkSpec(f"d{i}", "cell", Shaping(bw_mbit=10), Shaping(bw_mbit=40)) for i in range(n - 1)]
    links.append(LinkSpec("cell", "edge", Shaping(bw_mbit=1000), Shaping(bw_mbit=1000)))
    return Topology(f"star-{n}", Path(f"star-{n}.yaml"), nodes, links)


def measure(n: int, shaper: str) -> dict:
    net = EmulatedNetwork(star(n), shaper=shaper)
    t0 = time.monotonic()
    net.start()
    t_up = time.monotonic() - t0
    try:
        far = net.cmd("d0", ["ping", "-c", "1", "-W", "2", net.ip("edge")])
        reach = " 0% packet loss" in far
    finally:
        t1 = time.monotonic()
        net.stop()
        t_down = time.monotonic() - t1
    left = sum(map(len, leftovers(net.run_id).values()))
    return {"nodes": n, "up_s": t_up, "down_s": t_down, "reach": reach, "leftovers": left}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="10,50,100")
    ap.add_argument("--shaper", default="kernel", choices=("kernel", "userspace"))
    args = ap.parse_args()
    rows = [measure(int(n), args.shaper) for n in args.sizes.split(",")]
    t = Table(title=f"EmulatedNetwork scale ({args.shaper} shaper, devices on one cell)")
    for col in ("nodes", "bring-up s", "teardown s", "d0 -> edge ping", "leftovers"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["nodes"]), f"{r['up_s']:.2f}", f"{r['down_s']:.2f}",
                  "ok" if r["reach"] else "FAIL", str(r["leftovers"]))
    Console().print(t)


if __name__ == "__main__":
    main()
