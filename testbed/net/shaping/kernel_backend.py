"""The kernel shaping backend: HTB + netem qdiscs on each end's egress, traces replayed by a thread."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from testbed.net.errors import NetworkError
from testbed.net.offload import disable_offloads
from testbed.net.shaping import kernel as qdiscs
from testbed.net.shaping.link import Link, LinkEnd
from testbed.spec.topology import Shaping

if TYPE_CHECKING:  # replay (and numpy with it) loads only for a link that replays a trace
    from testbed.net.shaping.replay import TraceReplayer

PARALLEL = 8  # ethtool runs at once


class KernelShaper:
    """Shapes both directions of a link with the qdiscs of ``testbed.net.shaping.kernel``."""

    name = "kernel"
    joins_in_root = False  # a link is one veth pair between its two nodes

    def __init__(self, netem: bool) -> None:
        self.netem = netem
        self.sockets = qdiscs.NetlinkSockets()
        self._replayer: TraceReplayer | None = None
        self._shaped: dict[tuple[int, str], tuple[LinkEnd, int, Shaping]] = {}  # (link, side) -> end

    @property
    def trace_t0(self) -> float | None:
        """``time.monotonic()`` at which trace replay began (bin 0), None without traces."""
        return self._replayer.t0 if self._replayer is not None else None

    def apply_all(self, links: list[Link]) -> None:
        """Shape every link as its spec says, then start trace replay."""
        ends = {id(e): e for link in links if self._shaped_link(link) for e in (link.a, link.b)}
        # a packet is one packet: no 64 KB GSO/TSO/GRO aggregates in the queues (both ends: a
        # forwarding host's receive side could aggregate too)
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(lambda e: disable_offloads(e.ifname, pid=e.pid), ends.values()))
        for link in links:
            self.apply(link, link.spec.up, link.spec.down)
        if self._replayer is not None and not self._replayer.is_alive():
            self._replayer.start()

    @staticmethod
    def _shaped_link(link: Link) -> bool:
        return qdiscs.needs_shaping(link.spec.up) or qdiscs.needs_shaping(link.spec.down)

    def apply(self, link: Link, up: Shaping, down: Shaping) -> None:
        for side, end, s in (("up", link.a, up), ("down", link.b, down)):
            if qdiscs.needs_shaping(s):
                self._apply_end(link, side, end, s)

    def _apply_end(self, link: Link, side: str, end: LinkEnd, s: Shaping) -> None:
        ipr = self.sockets.get(end.pid)
        if s.trace is None:
            idx = qdiscs.apply(ipr, end.ifname, s, self.netem)
        else:
            from testbed.net.shaping.replay import BIN_MS, TraceReplayer, start_bin
            from testbed.spec.traces import load_trace

            trace = load_trace(s.trace, s.format or "mahimahi")
            bins = trace.rate_bins_mbit(BIN_MS)
            first = float(bins[start_bin(s) % len(bins)])
            idx = qdiscs.apply(ipr, end.ifname, s, self.netem, start_mbit=first)
            if self._replayer is None:
                self._replayer = TraceReplayer(self.sockets)
            self._replayer.add(link.name, end.pid, idx, s, trace, self.netem)
        self._shaped[(link.index, side)] = (end, idx, s)

    def update(self, link: Link, up: Shaping | None = None, down: Shaping | None = None) -> None:
        """Change a shaped link's rate, delay and loss in place (queues keep their packets).

        The new settings must keep the qdisc layout: a rate where there was one, netem where
        there was netem; a trace is changed by its replay, not here."""
        for side, s in (("up", up), ("down", down)):
            if s is None:
                continue
            key = (link.index, side)
            if key not in self._shaped:
                raise NetworkError(f"link {link.name}: {side} is not shaped, nothing to update")
            end, idx, old = self._shaped[key]
            if not self._same_qdiscs(old, s):
                raise NetworkError(f"link {link.name}: {side}: an update must keep the qdiscs (rate or none, "
                                   "netem or none, no trace); remove and apply the link instead")
            ipr = self.sockets.get(end.pid)
            if s.bw_mbit is not None:
                qdiscs.set_rate(ipr, idx, s.bw_mbit)
            if self.netem and qdiscs.wants_netem(old):
                qdiscs.set_netem(ipr, idx, s, s.delay_ms, s.loss_pct, rate_mbit=s.bw_mbit)
            self._shaped[key] = (end, idx, s)

    def _same_qdiscs(self, old: Shaping, new: Shaping) -> bool:
        """Can ``new`` be set by changing the qdiscs ``old`` made (no qdisc added or removed)?"""
        if new.trace is not None or old.trace is not None or (new.bw_mbit is None) != (old.bw_mbit is None):
            return False
        netem = self.netem and qdiscs.wants_netem(old)
        if self.netem and qdiscs.wants_netem(new) != netem:
            return False
        return netem or new.queue_pkts == old.queue_pkts  # a pfifo's length is not changed here

    def remove(self, link: Link) -> None:
        if self._replayer is not None:
            self._replayer.drop(link.name)
        for side in ("up", "down"):
            entry = self._shaped.pop((link.index, side), None)
            if entry is not None:
                qdiscs.remove(self.sockets.get(entry[0].pid), entry[0].ifname)

    def check(self) -> None:
        """Raise ``NetworkError`` naming the link when trace replay has stopped on an error."""
        r = self._replayer
        if r is not None and r.error is not None:
            link, err = r.error
            raise NetworkError(f"link {link}: trace replay stopped: {err}")
        if r is not None and r.t0 and not r.is_alive() and not r.stopping:
            raise NetworkError("trace replay thread exited")

    def close(self) -> None:
        """Stop trace replay and close our sockets (the qdiscs go with their interfaces)."""
        if self._replayer is not None:
            self._replayer.stop()
        self.sockets.close_mine()
