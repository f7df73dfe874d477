"""Analytic delivery model of a caching topology: who reaches whom, at what rate and RTT, and how long a
fetch and a request's time to first token take.

From a topology (``testbed.spec.topology``): the repository is the ``cloud`` node; each ``edge`` node
serves the devices of its cell (devices linked to it directly or through a ``cell`` bridge).  Paths are
the lowest-delay routes; a path's rate is the smallest ``bw_mbit`` along it in the direction of travel
(unshaped links count as ``UNSHAPED_MBIT``) and its RTT is the sum of both directions' delays.  Two edges
are *connected* when a route joins them without passing through the cloud or a device: only then can an
edge fetch blocks from another edge; otherwise every missing block comes from the repository.

A fetch over a path is modelled as what the delivery protocol (``testbed.apps.caching.delivery``) and TCP
must pay, each term a property of the protocol or the link (``AnalyticModel.fetch_ms``):

* **one protocol round trip**: the fetcher knows the blocks' sizes from their manifest, so every request
  (each block's chunk digests and all its chunks) goes out at once and the first byte comes back one RTT
  later;
* **the bytes on the wire**: the blocks' bytes plus each reply's framing (a ``CHUNK`` per chunk and a
  ``META`` with 32 B of digest per chunk for a block of more than one chunk, each a ``FRAME_BYTES``
  header frame and ZeroMQ's frame prefixes), carried as TCP payload: ``MSS`` of every ``MTU`` bytes the
  link counts (the shapers count IP packet bytes; 1448 of 1500 with TCP timestamps);
* **TCP's slow start**: a fetch starts from TCP's initial window of ``INIT_CWND`` segments (RFC 6928,
  Linux's default; it is also the restart window after an idle connection, RFC 5681 section 4.1, which
  Linux applies with ``tcp_slow_start_after_idle=1``, its default: an edge's fetches are seconds apart),
  doubling every round trip until the window covers the path's bandwidth-delay product; a short fetch
  pays several RTTs instead of bytes / rate (a 0.9 MB model over 50 Mbit/s and 40 ms: 5 rounds).

The credit window is four times the bandwidth-delay product in bytes, so it never limits the rate.
Blocks from different sources (a neighbouring edge and the repository) arrive in parallel: the request
waits for the slowest.  Concurrent fetches sharing a link are not modelled (replay treats requests one at
a time).  Not modelled either: the two user-space ends' processing and the store's disk writes (they
overlap the transfer).

Time to first token = fetch time + the device's RTT to its edge + prefill of the prompt and one decode
step, modelled as ``compute_ms_per_mb`` per MB of the model's bytes.

Public API: ``PathInfo``, ``CacheNetwork`` (``edges``, ``repository``, ``cells``, ``device_path``,
``repo_path``, ``peer_path``, ``peers``), ``cache_network``, ``AnalyticModel`` (``fetch_ms``,
``ttft_ms``), ``framing_bytes``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from testbed.apps.caching.delivery import DEFAULT_CHUNK
from testbed.net.tcp_model import INIT_CWND, MSS, MTU, transfer_s
from testbed.spec.errors import SpecError, got
from testbed.spec.topology import Topology
from testbed.wire.blockxfer import DIGEST_BYTES, HEADER

UNSHAPED_MBIT = 10_000.0  # an unshaped link (no bw_mbit): 10 Gbit/s


@dataclass(frozen=True)
class PathInfo:
    """A route in one direction: its bottleneck rate (Mbit/s) and round-trip time (ms)."""

    rate_mbit: float
    rtt_ms: float
    hops: tuple[str, ...]


@dataclass
class CacheNetwork:
    edges: list[str]
    repository: str
    cells: dict[str, list[str]]  # edge -> its devices
    device_path: dict[str, PathInfo]  # device -> path edge -> device
    repo_path: dict[str, PathInfo]  # edge -> path repository -> edge
    peer_path: dict[tuple[str, str], PathInfo] = field(default_factory=dict)  # (from, to), edges only

    _peers: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def peers(self, edge: str) -> list[str]:
        """The edges ``edge`` can fetch from, nearest (lowest RTT) first."""
        if edge not in self._peers:
            ps = [(p.rtt_ms, a) for (a, b), p in self.peer_path.items() if b == edge]
            self._peers[edge] = [a for _, a in sorted(ps)]
        return self._peers[edge]


def _graph(topo: Topology) -> dict[str, list[tuple[str, float, float]]]:
    """node -> [(neighbour, one-way delay ms, rate Mbit/s towards the neighbour)]."""
    g: dict[str, list[tuple[str, float, float]]] = {n: [] for n in topo.nodes}
    for lk in topo.links:
        g[lk.a].append((lk.b, lk.up.delay_ms, lk.up.bw_mbit or UNSHAPED_MBIT))
        g[lk.b].append((lk.a, lk.down.delay_ms, lk.down.bw_mbit or UNSHAPED_MBIT))
    return g


def _route(topo: Topology, g, src: str, dst: str, through: set[str]) -> PathInfo | None:
    """Lowest-delay route src -> dst whose inner nodes all have a role in ``through``."""
    dist = {src: 0.0}
    prev: dict[str, str] = {}
    heap = [(0.0, src)]
    while heap:
        d, n = heapq.heappop(heap)
        if n == dst:
            break
        if d > dist.get(n, float("inf")) or (n != src and topo.nodes[n].role not in through):
            continue
        for nb, delay, _ in g[n]:
            nd = d + delay
            if nd < dist.get(nb, float("inf")):
                dist[nb], prev[nb] = nd, n
                heapq.heappush(heap, (nd, nb))
    if dst not in dist:
        return None
    hops = [dst]
    while hops[-1] != src:
        hops.append(prev[hops[-1]])
    hops.reverse()
    rate, rtt = float("inf"), 0.0
    for a, b in zip(hops, hops[1:], strict=False):
        fwd = next(x for x in g[a] if x[0] == b)
        back = next(x for x in g[b] if x[0] == a)
        rate = min(rate, fwd[2])
        rtt += fwd[1] + back[1]
    return PathInfo(rate, rtt, tuple(hops))


def cache_network(topo: Topology) -> CacheNetwork:
    """The caching view of a topology (SpecError when it has no cloud, no edge, or an edge without
    devices)."""
    src = str(topo.source)
    clouds = [n.name for n in topo.nodes.values() if n.role == "cloud"]
    edges = [n.name for n in topo.nodes.values() if n.role == "edge"]
    if len(clouds) != 1:
        raise SpecError(src, "nodes", f"a caching topology needs exactly one cloud node (the repository) "
                        f"{got(len(clouds))}")
    if not edges:
        raise SpecError(src, "nodes", "a caching topology needs edge nodes (got none)")
    g = _graph(topo)
    cells: dict[str, list[str]] = {e: [] for e in edges}
    device_path: dict[str, PathInfo] = {}
    for dev in (n.name for n in topo.nodes.values() if n.role == "device"):
        best = None
        for e in edges:
            p = _route(topo, g, e, dev, {"cell"})
            if p is not None and (best is None or p.rtt_ms < best[1].rtt_ms):
                best = (e, p)
        if best is not None:
            cells[best[0]].append(dev)
            device_path[dev] = best[1]
    repo_path: dict[str, PathInfo] = {}
    for e in edges:
        p = _route(topo, g, clouds[0], e, {"edge", "cell", "cloud"})
        if p is None:
            raise SpecError(src, "links", f"edge {e} has no route to the cloud {got(e)}")
        repo_path[e] = p
    for e, devs in cells.items():
        if not devs:
            raise SpecError(src, "nodes", f"edge {e} has no devices in its cell {got(e)}")
    peer_path = {}
    for a in edges:
        for b in edges:
            if a != b:
                p = _route(topo, g, a, b, {"edge", "cell"})
                if p is not None:
                    peer_path[(a, b)] = p
    return CacheNetwork(edges, clouds[0], cells, device_path, repo_path, peer_path)


FRAME_BYTES = HEADER.size  # the delivery protocol's fixed header frame, 72 bytes
ZMTP_PREFIX = 9  # ZeroMQ's per-frame flags + size (1 + 8 bytes for a long frame; 2 for a short one)


def framing_bytes(block_bytes: int, chunk_bytes: int = DEFAULT_CHUNK) -> int:
    """Reply bytes one block costs beyond its own: a ``CHUNK`` header per chunk and, for a block of more
    than one chunk, a ``META`` with each chunk's digest (requests travel the other way)."""
    if block_bytes <= 0:
        return 0  # the empty block is known by its name: never asked for
    n = -(-block_bytes // chunk_bytes)
    reply = FRAME_BYTES + 2 * ZMTP_PREFIX
    return n * reply + (reply + n * DIGEST_BYTES if n > 1 else 0)


@dataclass(frozen=True)
class AnalyticModel:
    """Delivery and time-to-first-token model (see the module's docstring for each term)."""

    init_cwnd: int = INIT_CWND  # segments; 0: no slow start (the link rate from the first byte)
    compute_ms_per_mb: float = 0.15  # prefill + first decode step per MB of model (SmolLM2 fp32: ~80 ms)

    def fetch_ms(self, nbytes: int, path: PathInfo, overhead_bytes: int = 0) -> float:
        """Time to move ``nbytes`` of blocks (plus ``overhead_bytes`` of framing, ``framing_bytes``)
        over ``path`` (0 when there is nothing to move)."""
        if nbytes <= 0:
            return 0.0
        wire = nbytes + overhead_bytes
        if self.init_cwnd <= 0:
            return path.rtt_ms + wire * 8 * MTU / MSS / (path.rate_mbit * 1e3)
        return transfer_s(wire, path.rate_mbit, path.rtt_ms, self.init_cwnd) * 1e3

    def ttft_ms(self, fetch_ms: float, model_bytes: int, device: PathInfo) -> float:
        return fetch_ms + device.rtt_ms + self.compute_ms_per_mb * model_bytes / 1e6
