"""``testbed demo``: bring up the default topology, probe every link, show configured vs measured."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from testbed.net.network import EmulatedNetwork
from testbed.spec.topology import Shaping, Topology

PROBE_SECONDS = 3.0


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.1f}{unit}"


def probe_links(net: EmulatedNetwork, topo: Topology, seconds: float = PROBE_SECONDS) -> list[dict]:
    """One short probe per host-host link: configured and measured figures per direction."""
    from testbed.net.probe import probe

    rows = []
    for link in topo.links:
        if topo.nodes[link.a].role == "cell" or topo.nodes[link.b].role == "cell":
            continue  # a cell is not a host: its links are measured host to host elsewhere
        res = probe(net.runner(link.a), net.runner(link.b), net.ip(link.a, link.b), net.ip(link.b, link.a),
                    seconds)
        rows.append({"link": f"{link.a} <-> {link.b}", "up": link.up, "down": link.down, "measured": res})
    return rows


def _rtt(up: Shaping, down: Shaping) -> float:
    return up.delay_ms + down.delay_ms


def render(rows: list[dict], shaper: str, tcp_cc: str) -> Table:
    t = Table(title=f"configured vs measured ({shaper} shaper, {tcp_cc})")
    for col in ("link", "up Mbit/s", "down Mbit/s", "RTT ms", "loss up %", "loss down %"):
        t.add_column(col, justify="left" if col == "link" else "right")
    for r in rows:
        up, down, m = r["up"], r["down"], r["measured"]
        t.add_row(
            r["link"],
            f"{_fmt(up.bw_mbit)} / {_fmt(m.get('up_mbit'))}",
            f"{_fmt(down.bw_mbit)} / {_fmt(m.get('down_mbit'))}",
            f"{_fmt(_rtt(up, down))} / {_fmt(m.get('rtt_ms'))}",
            f"{_fmt(up.loss_pct)} / {_fmt(m.get('loss_up_pct'))}",
            f"{_fmt(down.loss_pct)} / {_fmt(m.get('loss_down_pct'))}",
        )
    return t


def demo(args: argparse.Namespace) -> int:
    from testbed.spec.topology import load_topology

    topo = load_topology(args.topo)
    console = Console()
    with EmulatedNetwork(topo, shaper=args.shaper, cli_log=sys.stdout) as net:
        console.print(f"[bold]{topo.name}[/]: shaper {net.shaper}, tcp_cc {net.tcp_cc}; "
                      f"probing each link for {PROBE_SECONDS:.0f} s per direction")
        rows = probe_links(net, topo)
        console.print(render(rows, net.shaper, net.tcp_cc))
    return 0
