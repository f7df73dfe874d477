"""The ``up``, ``probe`` and ``clean`` subcommands."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from testbed.net.addressing import AddressPlan, path_links
from testbed.net.capabilities import peak_rate_mbit
from testbed.net.network import EmulatedNetwork
from testbed.spec.topology import Shaping, Topology


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
    """Bring up, measure src <-> dst with ``testbed.net.probe``, tear down, print.

    Exit codes: 0 measured (a test stopped at its deadline over an outage reports what was
    delivered, with a note per direction); 1 a measurement failed (one line on stderr, e.g. a tool
    that exits with an error); 2 bad input (``SpecError``)."""
    from testbed.net.probe import ProbeError
    from testbed.net.probe import probe as run_probe

    topo = _load(args.topo)
    for flag, name in (("--src", args.src), ("--dst", args.dst)):
        if name not in topo.nodes or topo.nodes[name].role == "cell":
            from testbed.spec.errors import SpecError

            raise SpecError(args.topo, flag.lstrip("-"), f"no host named {name!r}")
    log = sys.stderr if not args.json else None
    try:
        with EmulatedNetwork(topo, shaper=args.shaper, runtime=args.runtime, cli_log=log) as net:
            up_at = time.monotonic()  # first: the userspace backend's replay began just before
            res = run_probe(net.runner(args.src), net.runner(args.dst), net.ip(args.src, args.dst),
                            net.ip(args.dst, args.src), args.seconds, timeline=args.timeline,
                            up_hint_mbit=path_rate_mbit(topo, net.plan, args.src, args.dst),
                            down_hint_mbit=path_rate_mbit(topo, net.plan, args.dst, args.src))
            shaper = net.shaper
            clock_t0 = replay_t0(net, up_at)
    except ProbeError as e:
        print(f"testbed probe: {args.topo}: {args.src} <-> {args.dst}: {e}", file=sys.stderr)
        return 1
    keys = ["up_mbit", "down_mbit", "rtt_ms", "loss_up_pct", "loss_down_pct", "machine_load", "notes"]
    out = {"shaper": shaper, **{k: res.get(k) for k in keys}}
    if args.timeline:
        for name, a, b in (("up", args.src, args.dst), ("down", args.dst, args.src)):
            t0 = res[f"{name}_timeline_started"] - clock_t0
            out[f"{name}_timeline"] = res[f"{name}_timeline"]
            out[f"{name}_timeline_trace_t0_s"] = t0
            out[f"{name}_capacity_timeline"] = capacity_timeline(topo, net.plan, a, b, t0,
                                                                 len(res[f"{name}_timeline"]))
    if args.json:
        print(json.dumps(out))
    else:
        _print_table(args, out)
    return 0


def replay_t0(net: EmulatedNetwork, up_at: float) -> float:
    """``time.monotonic()`` at trace time 0 of ``net``'s links.

    Kernel backend: when the replay thread began (``trace_t0``; read after the measurements:
    the thread sets it once it runs, which may be just after bring-up returns).  Userspace
    backend: each link process starts its trace when it is ready, just before the network is
    up: ``up_at``, taken right after bring-up, is that time to within the link processes'
    start-up spread (milliseconds for a few links)."""
    return net.trace_t0 or up_at


def _path(topo: Topology, plan: AddressPlan, src: str, dst: str) -> list[Shaping]:
    """The shaped directions a packet from ``src`` to ``dst`` crosses, in order."""
    return [getattr(topo.links[i], d) for i, d in path_links(topo, plan, src, dst)]


def path_rate_mbit(topo: Topology, plan: AddressPlan, src: str, dst: str) -> float | None:
    """The lowest configured (peak) rate along the routed path src -> dst (None: unlimited)."""
    known = [r for r in map(peak_rate_mbit, _path(topo, plan, src, dst)) if r is not None]
    return min(known) if known else None


def capacity_timeline(topo: Topology, plan: AddressPlan, src: str, dst: str, t0: float | None,
                      seconds: int) -> list[float] | None:
    """The capacity (Mbit/s) the path src -> dst offered in each second from trace time ``t0``:
    per second the lowest link on it (a trace's replayed capacity, or a fixed rate).
    None when no link on the path limits the rate."""
    from testbed.spec.traces import load_trace

    if t0 is None:
        return None
    rows = []
    for s in _path(topo, plan, src, dst):
        if s.trace is not None:
            trace = load_trace(s.trace, s.format or "mahimahi")
            rows.append(trace.capacity_mbit_per_s(seconds, start_s=t0 + s.trace_start_s))
        elif s.bw_mbit is not None:
            rows.append([float(s.bw_mbit)] * seconds)
    return [min(col) for col in zip(*rows, strict=True)] if rows else None


def _print_table(args: argparse.Namespace, out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.src} <-> {args.dst} ({out['shaper']} shaper)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in out.items():
        if k in ("shaper", "notes"):
            continue
        if isinstance(v, list):
            v = " ".join(f"{x:.1f}" for x in v)
        elif isinstance(v, dict):  # machine_load
            v = (f"{v['busy_pct']:.0f} % busy, {v['steal_pct']:.0f} % stolen by the hypervisor, "
                 f"1 ms timers {v['timer_late_us']} us late")
        elif isinstance(v, float):
            v = f"{v:.2f}"
        t.add_row(k, "-" if v is None else str(v))
    Console().print(t)
    for way, lines in (out.get("notes") or {}).items():
        for line in lines:
            print(f"note: {way}: {line}")


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
