"""The ``up``, ``probe`` and ``clean`` subcommands."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from testbed.net.network import EmulatedNetwork
from testbed.spec.topology import Shaping


def _load(path: str):
    from testbed.spec.topology import load_topology

    return load_topology(path)


def up(args: argparse.Namespace) -> int:
    """Bring a topology up; Mininet CLI, or hold until SIGINT/SIGTERM with ``--no-cli``."""
    topo = _load(args.topo)
    with EmulatedNetwork(topo, shaper=args.shaper, runtime=args.runtime, cli_log=sys.stdout) as net:
        print(f"shaper: {net.shaper}  tcp_cc: {net.tcp_cc}  run: {net.run_id}", flush=True)
        for h in topo.hosts():
            with_addr = [net.plan.address(h.name, s) for s in net.plan.host_segments(h.name)]
            print(f"  {h.name}: {', '.join(with_addr) or '-'}", flush=True)
        if args.no_cli:
            print("ready (Ctrl-C or SIGTERM to tear down)", flush=True)
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
        else:
            from mininet.cli import CLI
            from mininet.log import setLogLevel

            setLogLevel("output")  # the CLI prints its results at this level
            CLI(net.mn)
    return 0


def probe(args: argparse.Namespace) -> int:
    """Bring up, measure src <-> dst with ``testbed.net.probe``, tear down, print."""
    from testbed.net.probe import probe as run_probe

    topo = _load(args.topo)
    for flag, name in (("--src", args.src), ("--dst", args.dst)):
        if name not in topo.nodes or topo.nodes[name].role == "cell":
            from testbed.spec.errors import SpecError

            raise SpecError(args.topo, flag.lstrip("-"), f"no host named {name!r}")
    log = sys.stderr if not args.json else None
    with EmulatedNetwork(topo, shaper=args.shaper, runtime=args.runtime, cli_log=log) as net:
        res = run_probe(net.runner(args.src), net.runner(args.dst), net.ip(args.src, args.dst),
                        net.ip(args.dst, args.src), args.seconds, timeline=args.timeline,
                        up_hint_mbit=path_rate_mbit(net, args.src, args.dst),
                        down_hint_mbit=path_rate_mbit(net, args.dst, args.src))
        shaper = net.shaper
    keys = ["up_mbit", "down_mbit", "rtt_ms", "loss_up_pct", "loss_down_pct"]
    if args.timeline:
        keys += ["up_timeline", "down_timeline"]
    out = {"shaper": shaper, **{k: res.get(k) for k in keys}}
    if args.json:
        print(json.dumps(out))
    else:
        _print_table(args, out)
    return 0


def _rate(s: Shaping) -> float | None:
    """Configured peak rate of one direction (a trace's highest 100 ms bin)."""
    if s.trace is not None:
        from testbed.spec.traces import load_trace

        return float(load_trace(s.trace, s.format or "mahimahi").rate_bins_mbit(100).max())
    return s.bw_mbit


def path_rate_mbit(net: EmulatedNetwork, src: str, dst: str) -> float | None:
    """The lowest configured rate along the routed path src -> dst (None: unlimited)."""
    topo, plan = net.topo, net.plan
    rates: list[float | None] = []
    cur = src
    while cur != dst:
        nxt, seg = plan.next_hop[cur][dst]
        for i in plan.segments[seg].links:
            link = topo.links[i]
            if {link.a, link.b} == {cur, nxt}:
                rates.append(_rate(link.up if link.a == cur else link.down))
            elif cur in (link.a, link.b) and plan.segments[seg].cell is not None:
                rates.append(_rate(link.up if link.a == cur else link.down))  # cur -> cell
            elif nxt in (link.a, link.b) and plan.segments[seg].cell is not None:
                rates.append(_rate(link.up if link.b == nxt else link.down))  # cell -> nxt
        cur = nxt
    known = [r for r in rates if r is not None]
    return min(known) if known else None


def _print_table(args: argparse.Namespace, out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.src} <-> {args.dst} ({out['shaper']} shaper)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in out.items():
        if k == "shaper":
            continue
        if isinstance(v, list):
            v = " ".join(f"{x:.1f}" for x in v)
        elif isinstance(v, float):
            v = f"{v:.2f}"
        t.add_row(k, str(v))
    Console().print(t)


def clean(args: argparse.Namespace) -> int:
    """Remove leftovers of runs whose owner process died (``--all``: every run, live ones too)."""
    from testbed.net.clean import clean as do_clean

    removed = do_clean(all_runs=bool(getattr(args, "all", False)))
    if args.json:
        print(json.dumps(removed))
    else:
        total = sum(len(v) for v in removed.values())
        for kind, items in removed.items():
            if items:
                print(f"removed {len(items)} {kind}: {' '.join(map(str, items))}")
        if not total:
            print("nothing to clean")
    return 0
