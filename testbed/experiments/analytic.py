"""Analytic latency model: measured per-shard compute + bytes / bandwidth + propagation delay.

For a request of ``n`` steps through hops ``h_0 .. h_k`` (``h_0`` is the device):

    predicted = sum_i (compute_i + codec_i)
              + sum_{i>0} [ bytes_up_i * F / bw(h_{i-1} -> h_i) + bytes_down_i * F / bw(h_i -> h_{i-1})
                            + n * (delay(h_{i-1} -> h_i) + delay(h_i -> h_{i-1})) ]

``bw`` is the bottleneck of the shaped links on the path (a trace counts with its
mean capacity; an unshaped link is free), ``delay`` the sum of their one-way
delays, and ``F = 1500 / 1448`` the framing overhead of TCP/IPv4 with timestamps
(payload 1448 bytes per 1500-byte IP packet: link rates count IP bytes on both
backends).  Compute, codec time and bytes are the measured ones, so measured/predicted isolates what the model
leaves out: slow start after idle, queueing behind other flows, scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from testbed.apps.inference.placement import Stage, parse_placement
from testbed.net.addressing import AddressPlan, path_links, plan
from testbed.spec.topology import Shaping, Topology
from testbed.spec.traces import load_trace

FRAMING = 1500 / 1448


@dataclass(frozen=True)
class PathFigures:
    bw_mbit: float | None  # bottleneck; None = unshaped
    delay_ms: float
    links: int


def _rate(sh: Shaping) -> float | None:
    if sh.trace is not None:
        return load_trace(sh.trace, sh.format).mean_mbit()
    return sh.bw_mbit


def route(topo: Topology, a: str, b: str, addresses: AddressPlan | None = None) -> list[Shaping]:
    """The shaped directions a packet from ``a`` to ``b`` crosses, along the network's own routes."""
    links = path_links(topo, addresses or plan(topo), a, b)
    return [getattr(topo.links[i], d) for i, d in links]


def path_figures(topo: Topology, a: str, b: str, addresses: AddressPlan | None = None) -> PathFigures:
    shapes = route(topo, a, b, addresses)
    rates = [r for r in (_rate(s) for s in shapes) if r is not None]
    return PathFigures(min(rates) if rates else None, sum(s.delay_ms for s in shapes), len(shapes))


def serialization_ms(nbytes: float, bw_mbit: float | None) -> float:
    return 0.0 if not bw_mbit else nbytes * FRAMING * 8 / (bw_mbit * 1e3)


def predict(topo: Topology, placement: str | Sequence[Stage], result: dict[str, Any]) -> dict[str, Any]:
    """Predicted end-to-end and mean per-token latency of one request from its measured parts.

    ``placement``: the request's stages, or their placement string (``phone=0:8,mec=8:30``).
    """
    stages = parse_placement(placement, topo) if isinstance(placement, str) else placement
    nodes = [st.node for st in stages]
    addresses = plan(topo)
    per_hop = result.get("per_hop") or []
    steps = len(result.get("token_ms") or result.get("tokens") or [])
    hops = []
    total = 0.0
    for i, h in enumerate(per_hop):
        compute = float(h.get("compute_ms", 0.0)) + float(h.get("codec_ms", 0.0))
        node = nodes[i] if i < len(nodes) else None
        entry: dict[str, Any] = {"node": node, "compute_ms": round(compute, 3)}
        transfer = 0.0
        if i > 0 and i < len(nodes):
            fwd = path_figures(topo, nodes[i - 1], nodes[i], addresses)
            back = path_figures(topo, nodes[i], nodes[i - 1], addresses)
            transfer = (serialization_ms(h.get("bytes_up", 0), fwd.bw_mbit)
                        + serialization_ms(h.get("bytes_down", 0), back.bw_mbit)
                        + steps * (fwd.delay_ms + back.delay_ms))
            entry.update(transfer_ms=round(transfer, 3), bw_up_mbit=fwd.bw_mbit, bw_down_mbit=back.bw_mbit,
                         rtt_ms=fwd.delay_ms + back.delay_ms)
            measured = h.get("transfer_ms")
            if measured is not None and transfer > 0:
                entry["transfer_ratio"] = round(float(measured) / transfer, 3)
        total += compute + transfer
        hops.append(entry)
    return {
        "e2e_ms": round(total, 3),
        "per_token_ms": round(total / steps, 3) if steps else None,
        "per_hop": hops,
        "model": "measured compute + bytes x 1500/1448 / bottleneck bandwidth + steps x RTT",
    }
