"""Shaping fidelity of the userspace link process: configured vs measured, and its CPU.

Run as root: ``.venv/bin/python bench/net_fidelity.py [--seconds 4] [--only rate,delay,loss,trace]``.

Each grid point is a fresh pair of namespaces joined by the link process
(``testbed.net.shaping.userspace.netns_link``), measured with ``testbed.net.probe``:

* rate: TCP (cubic) goodput vs the goodput the rate allows (MSS 1448 per 1500-byte packet),
  and the link process CPU (share of one core, from /proc/PID/stat) during the transfer;
* delay: ping RTT vs the configured two-way delay;
* loss: UDP loss (receiver side, below capacity) vs the configured loss;
* trace: per-second UDP goodput of a saturating flow vs a mahimahi trace's capacity.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from testbed.net import probe
from testbed.net.shaping.userspace import NetnsLink, netns_link
from testbed.spec.topology import Shaping
from testbed.spec.traces import load_trace

TCP_SHARE = 1448 / 1500
UDP_SHARE = probe.UDP_PAYLOAD / (probe.UDP_PAYLOAD + 28)
TRACE = Path(__file__).resolve().parents[2] / "shared/traces/mahimahi/TMobile-LTE-short.up"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15)


def with_cpu(link: NetnsLink, fn: Callable[[], float]) -> tuple[float, float]:
    """``fn()`` and the link process's CPU share (of one core) while it ran."""
    c0, t0 = cpu_seconds(link.proc.pid), time.monotonic()
    value = fn()
    return value, (cpu_seconds(link.proc.pid) - c0) / (time.monotonic() - t0)


def rate_rows(seconds: float) -> list[list[str]]:
    rows = []
    for mbit in (1, 10, 50, 100, 200):
        s = Shaping(bw_mbit=mbit, delay_ms=2)
        with netns_link(s, s) as link:
            got, cpu = with_cpu(link, lambda link=link: probe.measure_throughput(
                link.run1, link.run2, link.ip2, seconds))
        want = mbit * TCP_SHARE
        rows.append([f"rate {mbit} Mbit/s, 2+2 ms", f"{want:.2f}", f"{got:.2f}",
                     f"{100 * (got - want) / want:+.1f}%", f"{cpu:.2f}"])
    with netns_link(Shaping(), Shaping()) as link:
        got, cpu = with_cpu(link, lambda: probe.measure_throughput(link.run1, link.run2, link.ip2, seconds))
    rows.append(["unlimited (link process ceiling)", "-", f"{got:.1f}", "-", f"{cpu:.2f}"])
    return rows


def delay_rows(_seconds: float) -> list[list[str]]:
    rows = []
    for delay, jitter in ((1, 0), (10, 0), (25, 0), (50, 0), (20, 5)):
        s = Shaping(delay_ms=delay, jitter_ms=jitter)
        with netns_link(s, s) as link:
            rtt, cpu = with_cpu(link, lambda link=link: probe.measure_rtt(link.run1, link.ip2, count=40,
                                                                         interval=0.05)["avg"])
        want = 2 * delay
        label = f"delay {delay}+{delay} ms" + (f" jitter {jitter}" if jitter else "")
        rows.append([label, f"{want:.1f} ms", f"{rtt:.2f} ms", f"{rtt - want:+.2f} ms", f"{cpu:.2f}"])
    return rows


def loss_rows(seconds: float) -> list[list[str]]:
    rows = []
    for loss in (1.0, 5.0, 10.0):
        with netns_link(Shaping(bw_mbit=50, loss_pct=loss), Shaping()) as link:
            got, cpu = with_cpu(link, lambda link=link: probe.measure_loss(
                link.run1, link.run2, link.ip2, rate_mbit=20, seconds=seconds))
        rows.append([f"loss {loss:g}% (UDP 20 Mbit/s)", f"{loss:.1f}%", f"{got:.2f}%",
                     f"{got - loss:+.2f} pp", f"{cpu:.2f}"])
    return rows


def trace_rows(seconds: float) -> list[list[str]]:
    if not TRACE.exists():
        return [[f"trace {TRACE.name}", "missing", "-", "-", "-"]]
    secs = max(4, int(seconds * 2))
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        with netns_link(Shaping(trace=TRACE, format="mahimahi"), Shaping(), stats_path=stats) as link:
            started = json.loads(stats.read_text())["started_unix"]
            launched = time.time()
            got, cpu = with_cpu(link, lambda: probe.measure_timeline(
                link.run1, link.run2, link.ip2, rate_mbit=15, seconds=secs))
    cap = load_trace(TRACE).capacity_mbit_per_s(len(got), launched - started + 0.05)
    want = [c * UDP_SHARE for c in cap]
    errs = [abs(g - w) / w for g, w in zip(got, want, strict=True)]
    return [[f"trace {TRACE.name}, {len(got)} s", f"{sum(want) / len(want):.2f} mean",
             f"{sum(got) / len(got):.2f} mean", f"max {100 * max(errs):.1f}% / s", f"{cpu:.2f}"]]


def kernel_rows(seconds: float) -> list[list[str]]:
    """Kernel backend: HTB rates and HTB trace replay, through EmulatedNetwork.

    Rates count IP bytes (HTB's size table takes the Ethernet header off), so TCP goodput is at
    most 1448/1500 of the rate, as on the userspace backend."""
    from testbed.net.network import EmulatedNetwork
    from testbed.spec.topology import LinkSpec, NodeSpec, Topology

    def pair(up: Shaping, down: Shaping) -> Topology:
        nodes = {"a": NodeSpec("a", "device"), "b": NodeSpec("b", "edge")}
        return Topology("pair", Path("pair.yaml"), nodes, [LinkSpec("a", "b", up, down)])

    rows = []
    for mbit in (10, 50, 100, 200):
        with EmulatedNetwork(pair(Shaping(bw_mbit=mbit), Shaping()), shaper="kernel") as net:
            got = probe.measure_throughput(net.runner("a"), net.runner("b"), net.ip("b"), seconds)
        want = mbit * 1448 / 1500
        rows.append([f"kernel HTB rate {mbit} Mbit/s", f"{want:.2f}", f"{got:.2f}",
                     f"{100 * (got - want) / want:+.1f}%", "-"])
    if TRACE.exists():
        secs = max(4, int(seconds * 2))
        up = Shaping(trace=TRACE, format="mahimahi", queue_pkts=50)
        with EmulatedNetwork(pair(up, Shaping()), shaper="kernel") as net:
            launched = time.monotonic()
            got = probe.measure_timeline(net.runner("a"), net.runner("b"), net.ip("b"), rate_mbit=40,
                                         seconds=secs)
            offset = launched - net.trace_t0
        # UDP goodput per IP packet (the rate counts IP bytes)
        share = probe.UDP_PAYLOAD / (probe.UDP_PAYLOAD + 28)
        want = [c * share for c in load_trace(TRACE).capacity_mbit_per_s(len(got), offset + 0.05)]
        errs = [abs(g - w) / w for g, w in zip(got, want, strict=True)]
        rows.append([f"kernel HTB trace {TRACE.name}, {len(got)} s", f"{sum(want) / len(want):.2f} mean",
                     f"{sum(got) / len(got):.2f} mean", f"max {100 * max(errs):.1f}% / s", "-"])
    return rows


GRIDS = {"rate": rate_rows, "delay": delay_rows, "loss": loss_rows, "trace": trace_rows,
         "kernel": kernel_rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--only", default=",".join(GRIDS))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("net_fidelity: needs root (network namespaces)", file=sys.stderr)
        return 2
    header = ["point", "expected", "measured", "error", "link CPU"]
    rows = []
    for name in args.only.split(","):
        rows += GRIDS[name.strip()](args.seconds)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
