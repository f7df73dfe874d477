"""``testbed demo`` (``make demo``): the main job on the embedded default, in three parts.

1. Bring the device-edge-cloud topology up and probe every link: configured vs measured.
2. Split inference of SmolLM2-135M (device -> edge -> cloud) across the shaped links: the answer,
   TTFT/TPOT and a per-hop table of compute, transfer and bytes.
3. The ``experiments/quick.yaml`` suite (baselines vs a split at two uplink bandwidths) and its
   summary table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from testbed.net.capabilities import ceiling
from testbed.net.network import EmulatedNetwork
from testbed.net.probe import ProbeError
from testbed.spec.topology import Shaping, Topology

PROBE_SECONDS = 3.0
DEMO_PROMPT = "What is the capital of France? Answer in one sentence."
DEMO_PLACEMENT = "phone=0:8,mec=8:20,cloud=20:30"
DEMO_QUANT = "int4"
DEMO_CODEC = "fp16"
DEMO_TOKENS = 24
QUICK_SUITE = Path("experiments/quick.yaml")
QUICK_OUT = Path("results/demo-quick")


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.1f}{unit}"


def _set(x: float | None) -> str:
    """A configured figure, as written in the topology."""
    return "-" if x is None else f"{x:g}"


def probe_links(net: EmulatedNetwork, topo: Topology, seconds: float = PROBE_SECONDS) -> list[dict]:
    """One short probe per host-host link: configured and measured figures per direction."""
    from testbed.net.capabilities import peak_rate_mbit
    from testbed.net.probe import probe

    rows = []
    for link in topo.links:
        if topo.nodes[link.a].role == "cell" or topo.nodes[link.b].role == "cell":
            continue  # a cell is not a host: its links are measured host to host elsewhere
        res = probe(net.runner(link.a), net.runner(link.b), net.ip(link.a, link.b), net.ip(link.b, link.a),
                    seconds, up_hint_mbit=peak_rate_mbit(link.up), down_hint_mbit=peak_rate_mbit(link.down))
        rows.append({"link": f"{link.a} <-> {link.b}", "up": link.up, "down": link.down, "measured": res})
    return rows


def _rtt(up: Shaping, down: Shaping) -> float:
    return up.delay_ms + down.delay_ms


def _rate_cell(s: Shaping, got: float | None, shaper: str) -> tuple[str, bool]:
    """``set / expected TCP goodput / measured`` and whether the measurement is off.

    TCP goodput counts payload only (1448 bytes of every packet the rate counts); with random
    loss configured, cubic stays below the rate, so the expectation is an upper bound."""
    from testbed.net.capabilities import RATE_BYTES, TCP_PAYLOAD

    if s.trace is not None or s.bw_mbit is None or got is None:
        return f"{'trace' if s.trace is not None else _set(s.bw_mbit)} / - / {_fmt(got)}", False
    want = s.bw_mbit * TCP_PAYLOAD / RATE_BYTES
    if s.loss_pct:
        return f"{_set(s.bw_mbit)} / <={want:.1f} / {_fmt(got)}", got > want * 1.05
    return f"{_set(s.bw_mbit)} / {want:.1f} / {_fmt(got)}", abs(got - want) > 0.10 * want


def render(rows: list[dict], shaper: str, tcp_cc: str) -> Table:
    """Configured vs measured per link; a cell marked ``!`` is outside the tolerance: the backend
    did not emulate that figure faithfully on this run (rate 10 %, RTT 2 ms + 10 %, loss 1 pp).
    The caption says how much CPU time the hypervisor took meanwhile and how late timers ran, at
    most over the links: rates read low on a machine that it takes much from or wakes late."""
    loads = [r["measured"]["machine_load"] for r in rows if r["measured"].get("machine_load")]
    stolen = (f"; while probing, the hypervisor took up to {max(x['steal_pct'] for x in loads):.0f} % "
              f"of the CPU time and 1 ms timers ran up to {max(x['timer_late_us'] for x in loads)} us "
              "late" if loads else "")
    t = Table(title=f"configured vs measured ({shaper} shaper, {tcp_cc})",
              caption="Mbit/s: set / TCP goodput the rate allows / measured; RTT, loss: set / measured; "
                      "! = off by more than the tolerance (rate 10 %, RTT 2 ms + 10 %, loss 1 pp)" + stolen)
    for col in ("link", "up Mbit/s", "down Mbit/s", "RTT ms", "loss up %", "loss down %"):
        t.add_column(col, justify="left" if col == "link" else "right")

    def mark(text: str, off: bool) -> str:
        return f"[bold red]! {text}[/]" if off else text

    for r in rows:
        up, down, m = r["up"], r["down"], r["measured"]
        rtt_set, rtt_got = _rtt(up, down), m.get("rtt_ms")
        cells = [_rate_cell(up, m.get("up_mbit"), shaper), _rate_cell(down, m.get("down_mbit"), shaper),
                 (f"{_set(rtt_set)} / {_fmt(rtt_got)}",
                  rtt_got is not None and abs(rtt_got - rtt_set) > 2 + 0.1 * rtt_set)]
        for s, key in ((up, "loss_up_pct"), (down, "loss_down_pct")):
            got = m.get(key)
            off = got is not None and abs(got - s.loss_pct) > 1.0
            cells.append((f"{_set(s.loss_pct)} / {_fmt(got)}", off))
        t.add_row(r["link"], *(mark(text, off) for text, off in cells))
    return t


def hop_table(result: dict) -> Table:
    t = Table(title=f"split inference per hop ({result['quant']} weights, {result['codec']} activations)")
    for col in ("node", "layers", "compute ms", "transfer ms", "bytes up", "bytes down"):
        t.add_column(col, justify="left" if col == "node" else "right")
    for h in result["per_hop"]:
        t.add_row(h["node"], str(h["layers"]), f"{h['compute_ms']:.0f}", f"{h['transfer_ms']:.0f}",
                  str(h["bytes_up"]), str(h["bytes_down"]))
    return t


def split_inference(topo: Topology, shaper: str, console: Console) -> None:
    """Part 2: SmolLM2 split across the topology's device, edge and cloud."""
    from testbed.apps.inference.run import run_split_inference
    from testbed.model.loading import prepare_model_dir

    console.print(f"\n[bold]split inference[/] {DEMO_PLACEMENT}: {DEMO_PROMPT!r}")
    model_dir = prepare_model_dir(None)  # converts the shipped GGUF once (~20 s), then cached
    r = run_split_inference(topo, DEMO_PLACEMENT, DEMO_PROMPT, DEMO_TOKENS, DEMO_QUANT, DEMO_CODEC,
                            True, shaper, model_dir)
    console.print(f"[green]answer:[/] {r['text'].strip()}")
    console.print(f"{len(r['tokens'])} tokens, TTFT {r['ttft_ms']:.0f} ms, TPOT {r['tpot_ms']:.0f} ms, "
                  f"{r['bytes_up']} B up, {r['bytes_down']} B down, {r['shaper']} shaper")
    console.print(hop_table(r))


def quick_suite(console: Console) -> int:
    """Part 3: run quick.yaml and print its summary table."""
    from testbed.experiments.commands import run
    from testbed.report.commands import make_report

    console.print(f"\n[bold]suite[/] {QUICK_SUITE} -> {QUICK_OUT}")
    rc = run(argparse.Namespace(suite=str(QUICK_SUITE), out=str(QUICK_OUT), resume=False, only=None, set=[]))
    summary, pngs = make_report(QUICK_OUT)
    console.print(summary.read_text())
    console.print(f"plots: {', '.join(str(p) for p in pngs)}")
    return rc


def demo(args: argparse.Namespace) -> int:
    from testbed.spec.topology import load_topology

    topo = load_topology(args.topo)
    console = Console()
    with EmulatedNetwork(topo, shaper=args.shaper, cli_log=sys.stdout) as net:
        console.print(f"[bold]{topo.name}[/]: shaper {net.shaper}, tcp_cc {net.tcp_cc}; "
                      f"probing each link for {PROBE_SECONDS:.0f} s per direction")
        try:
            rows = probe_links(net, topo)
        except ProbeError as e:
            print(f"testbed demo: {args.topo}: probe: {e}", file=sys.stderr)
            return 1
        console.print(render(rows, net.shaper, net.tcp_cc))
        ceil = ceiling(net.shaper)
        console.print(f"the {net.shaper} backend shapes up to ~{ceil.mbit:.0f} Mbit/s faithfully on this "
                      f"machine (measured once, {ceil.path}); links set above it are capped")
    split_inference(topo, args.shaper, console)
    return quick_suite(console)
