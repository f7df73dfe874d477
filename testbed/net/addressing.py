"""IPv4 plan for a topology: L2 segments, one /24 each, host addresses and static routes.

A segment is either one host-host link or a cell (a bridge) with every link attached to it;
cells joined by links form one segment.  Segment ``k`` gets ``10.<1 + k // 256>.<k % 256>.0/24``
and its members ``.1``, ``.2``, ... in order of appearance.  Every host gets a route to each
segment it is not on, via the first hop of a shortest path (hosts forward packets).
Pure functions: no root needed.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field

from testbed.spec.errors import SpecError
from testbed.spec.topology import Topology


@dataclass
class Segment:
    index: int
    subnet: ipaddress.IPv4Network
    cell: str | None  # the (first) cell of a cell segment, None for a host-host link
    members: list[str] = field(default_factory=list)  # hosts, in address order
    links: list[int] = field(default_factory=list)  # indices into Topology.links


@dataclass
class AddressPlan:
    segments: list[Segment]
    link_segment: list[int]  # link index -> segment index
    addresses: dict[tuple[str, int], str]  # (host, segment) -> address
    routes: dict[str, list[tuple[str, str]]]  # host -> [(subnet, gateway)]
    next_hop: dict[str, dict[str, tuple[str, int]]]  # src -> dst -> (first hop, segment to it)

    def address(self, host: str, segment: int) -> str:
        return self.addresses[(host, segment)]

    def host_segments(self, host: str) -> list[int]:
        return [s for (h, s) in self.addresses if h == host]

    def ip(self, node: str, peer: str | None = None) -> str:
        """``node``'s address; with ``peer``, the one on the segment facing ``peer``."""
        segs = self.host_segments(node)
        if not segs:
            raise KeyError(f"{node} has no address (not a host, or not linked)")
        if peer is None or peer == node:
            return self.address(node, segs[0])
        hop = self.next_hop.get(node, {}).get(peer)
        if hop is None:
            raise KeyError(f"{peer} is not reachable from {node}")
        return self.address(node, hop[1])


def _subnet(k: int) -> ipaddress.IPv4Network:
    if k >= 254 * 256:
        raise ValueError("too many segments")
    return ipaddress.IPv4Network(f"10.{1 + k // 256}.{k % 256}.0/24")


def _segments(topo: Topology) -> tuple[list[Segment], list[int]]:
    cells = {n.name for n in topo.nodes.values() if n.role == "cell"}
    # union-find over cells joined by links
    parent = {c: c for c in cells}

    def find(c: str) -> str:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for link in topo.links:
        if link.a in cells and link.b in cells:
            parent[find(link.a)] = find(link.b)

    segments: list[Segment] = []
    cell_seg: dict[str, int] = {}
    link_segment: list[int] = []
    for i, link in enumerate(topo.links):
        cell = link.a if link.a in cells else link.b if link.b in cells else None
        if cell is None:
            seg = Segment(len(segments), _subnet(len(segments)), None)
            segments.append(seg)
            seg.members += [link.a, link.b]
        else:
            root = find(cell)
            if root not in cell_seg:
                cell_seg[root] = len(segments)
                segments.append(Segment(len(segments), _subnet(len(segments)), cell))
            seg = segments[cell_seg[root]]
            host = link.b if cell == link.a else link.a
            if host not in cells:
                if host in seg.members:
                    raise SpecError(topo.source, f"links[{i}]", f"{host} is linked twice to the same cell")
                seg.members.append(host)
        seg.links.append(i)
        link_segment.append(seg.index)
    for seg in segments:
        if len(seg.members) > 253:
            raise SpecError(topo.source, "links", f"more than 253 hosts on cell {seg.cell}")
    return segments, link_segment


def plan(topo: Topology) -> AddressPlan:
    """Addresses and routes for every host of ``topo``."""
    segments, link_segment = _segments(topo)
    addresses = {(h, s.index): str(s.subnet.network_address + i + 1)
                 for s in segments for i, h in enumerate(s.members)}
    # host adjacency: neighbour -> first segment shared with it
    adj: dict[str, dict[str, int]] = {h.name: {} for h in topo.hosts()}
    for s in segments:
        for a in s.members:
            for b in s.members:
                if a != b:
                    adj[a].setdefault(b, s.index)

    routes: dict[str, list[tuple[str, str]]] = {}
    next_hop: dict[str, dict[str, tuple[str, int]]] = {}
    for src in adj:
        first: dict[str, tuple[str, int]] = {}  # dst -> (first hop, segment to first hop)
        order: list[str] = []
        queue = deque([src])
        seen = {src}
        while queue:
            cur = queue.popleft()
            for nb, seg in adj[cur].items():
                if nb not in seen:
                    seen.add(nb)
                    first[nb] = (nb, seg) if cur == src else first[cur]
                    order.append(nb)
                    queue.append(nb)
        next_hop[src] = first
        own = {s for (h, s) in addresses if h == src}
        rank = {h: i for i, h in enumerate(order)}
        routes[src] = []
        for s in segments:
            if s.index in own:
                continue
            reachable = [m for m in s.members if m in rank]
            if not reachable:
                continue
            hop, via = first[min(reachable, key=rank.__getitem__)]
            routes[src].append((str(s.subnet), addresses[(hop, via)]))
    return AddressPlan(segments, link_segment, addresses, routes, next_hop)



def path_links(topo: Topology, addresses: AddressPlan, src: str, dst: str) -> list[tuple[int, str]]:
    """The links a packet from host ``src`` to host ``dst`` crosses, in order, as (link index,
    direction): ``up`` where it crosses from the link's ``a`` end to its ``b`` end, else ``down``.

    It follows the plan's routes (``next_hop``); a hop across a cell enters the bridge on the
    sender's link and leaves it on the receiver's (cells are never linked to each other).
    """
    out: list[tuple[int, str]] = []
    cur = src
    while cur != dst:
        hop = addresses.next_hop.get(cur, {}).get(dst)
        if hop is None:
            raise KeyError(f"{dst} is not reachable from {src}")
        nxt, seg = hop
        links = addresses.segments[seg].links
        into = next(i for i in links if cur in (topo.links[i].a, topo.links[i].b))
        out.append((into, "up" if topo.links[into].a == cur else "down"))
        if addresses.segments[seg].cell is not None:
            out_of = next(i for i in links if nxt in (topo.links[i].a, topo.links[i].b))
            out.append((out_of, "down" if topo.links[out_of].a == nxt else "up"))
        cur = nxt
    return out
