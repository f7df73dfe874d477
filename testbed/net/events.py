"""Applying a run's events (``testbed.spec.events``) at their time on a live ``EmulatedNetwork``.

One thread walks the events in time order from ``t0`` (the moment the workload starts):

* a capacity/delay/loss change merges its fields over the link's current settings and goes through
  ``EmulatedNetwork.update_link`` (kernel backend: netlink; userspace: the link process's control
  channel);
* an outage loses every packet sent on the link, both ways, for ``down_for_s``, then puts back
  the settings the link had (a change that falls inside the outage takes effect when it ends).
  Userspace: loss 100%.  Kernel: netem loss 100% where the direction has netem, else its HTB rate
  drops to the minimum HTB takes (8 kbit/s: near zero capacity);
* a handover moves the device's link (its shaping with it) from one cell's bridge to the other's
  and gives the device an address and a default route on the new cell (``handover``); the
  application's callback hears of it afterwards;
* kill and restart go to the callback the application registers (``on_node_event(event) ->
  detail``): the network does not know the node's programs.

Every application is recorded with its scheduled time, when it began (``started_s``) and when it
was done (``actual_s``), seconds from ``t0``, and an ``error`` when it failed; a failed event never
stops the ones after it.  Events the run did not reach are recorded with ``skipped``.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from testbed.net.errors import NetworkError
from testbed.spec.events import Event, merged
from testbed.spec.topology import Shaping

NodeCallback = Callable[[Event], str | None]
OUTAGE_LOSS_PCT = 100.0


def outage_shaping(shaper: str, netem: bool, s: Shaping) -> Shaping:
    """The settings that take one direction out, on backend ``shaper`` (``netem``: the kernel has it)."""
    if shaper != "kernel":
        return replace(s, loss_pct=OUTAGE_LOSS_PCT)
    from testbed.net.shaping import kernel as qdiscs

    if netem and qdiscs.wants_netem(s):
        return replace(s, loss_pct=OUTAGE_LOSS_PCT)
    if s.bw_mbit is not None:
        return replace(s, bw_mbit=qdiscs.MIN_RATE_MBIT)
    raise NetworkError("an outage on the kernel backend needs a rate or netem (delay, jitter or loss) "
                       "on the link: it has no qdisc to change")


class EventScheduler:
    """Applies ``events`` on ``net`` (anything with ``topo``, ``shaper``, ``backend``, ``update_link``).

    Use as a context manager around the workload or call ``start(t0)``/``stop()``; ``records``
    holds one dict per event once it has been applied (or failed)."""

    def __init__(self, net: Any, events: list[Event], on_node_event: NodeCallback | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.net = net
        self.events = sorted(events, key=lambda e: e.at_s)
        self.on_node_event = on_node_event
        self.clock = clock
        self.t0: float | None = None
        self.records: list[dict[str, Any]] = []
        links = net.topo.links if events else []  # a run without events asks nothing of its network
        self._current = {(lk.a, lk.b): {"up": lk.up, "down": lk.down} for lk in links}
        self._out: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="net-events", daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> EventScheduler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, t0: float | None = None) -> None:
        """Start the clock (``t0``: its 0, default now) and the thread."""
        self.t0 = self.clock() if t0 is None else t0
        if self.events:
            self._thread.start()

    def stop(self) -> None:
        """No event after this one; a link that is out stays as it is (the network goes down next).
        Events that had not come yet are recorded with ``skipped``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            done = len(self.records)
            if self.t0 is not None and done < len(self.events):
                for e in self.events[done:]:
                    self.records.append({**e.to_dict(), "skipped": "the workload ended before it"})

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every event (outage ends too) has been applied; True if they all were."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def now(self) -> float:
        """Seconds since ``t0``."""
        assert self.t0 is not None
        return self.clock() - self.t0

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        seq = itertools.count()
        todo: list[tuple[float, int, Callable[[], None]]] = []
        for e in self.events:
            heapq.heappush(todo, (e.at_s, next(seq), lambda e=e: self._apply(e)))
        while todo and not self._stop.is_set():
            at, _, action = todo[0]
            if self._stop.wait(max(0.0, at - self.now())):
                return
            heapq.heappop(todo)
            ended = action()
            if ended is not None:  # an outage: its end goes on the list
                heapq.heappush(todo, (ended[0], next(seq), ended[1]))

    def _apply(self, e: Event) -> Any:
        rec: dict[str, Any] = e.to_dict()
        rec["started_s"] = round(self.now(), 4)  # when its application began (actual_s: when it ended)
        ret = None
        try:
            if e.kind == "change":
                self._change(e)
            elif e.kind == "outage":
                self._outage_begin(e)
                end = e.at_s + (e.down_for_s or 0.0)
                rec["end_s"] = end
                ret = (end, lambda: self._outage_end(e, rec))
            elif e.kind == "handover":
                rec["detail"] = handover(self.net, e.node, e.src, e.dst)
                if self.on_node_event is not None:  # the application may move its sessions
                    more = self.on_node_event(e)
                    if more:
                        rec["detail"] += f"; {more}"
            elif self.on_node_event is None:
                raise NetworkError(f"no handler for {e.kind} events in this run")
            else:
                detail = self.on_node_event(e)
                if detail:
                    rec["detail"] = detail
        except Exception as exc:  # noqa: BLE001 - recorded; the next events still run
            rec["error"] = f"{type(exc).__name__}: {exc}"
            ret = None
        rec["actual_s"] = round(self.now(), 4)
        with self._lock:
            self.records.append(rec)
        return ret

    def _push(self, link: tuple[str, str], up: Shaping | None, down: Shaping | None) -> None:
        self.net.update_link(link[0], link[1], up, down)

    def _change(self, e: Event) -> None:
        assert e.link is not None
        cur = self._current[e.link]
        up = merged(cur["up"], e.up) if e.up is not None else None
        down = merged(cur["down"], e.down) if e.down is not None else None
        if e.link not in self._out:
            self._push(e.link, up, down)
        cur.update({k: v for k, v in (("up", up), ("down", down)) if v is not None})

    def _outage_begin(self, e: Event) -> None:
        assert e.link is not None
        cur = self._current[e.link]
        shaper = getattr(self.net, "shaper", "userspace")
        netem = bool(getattr(getattr(self.net, "backend", None), "netem", False))
        up, down = (outage_shaping(shaper, netem, cur[side]) for side in ("up", "down"))
        self._push(e.link, up, down)
        self._out.add(e.link)

    def _outage_end(self, e: Event, rec: dict[str, Any]) -> None:
        assert e.link is not None
        self._out.discard(e.link)
        cur = self._current[e.link]
        try:
            self._push(e.link, cur["up"], cur["down"])
        except Exception as exc:  # noqa: BLE001
            rec["error"] = f"restoring: {type(exc).__name__}: {exc}"
        rec["actual_end_s"] = round(self.now(), 4)


def handover(net: Any, device: str, src: str, dst: str) -> str:
    """Re-attach ``device``'s link from cell ``src`` to cell ``dst`` on a live ``EmulatedNetwork``.

    The link keeps its shaping (the radio link goes with the device): its cell-side bridge port
    moves from ``src``'s bridge to ``dst``'s.  The device takes the next free address of ``dst``'s
    segment and a default route via that segment's first non-device host (the new cell's edge);
    every other host already routes to that segment.  ``net.plan`` is updated, so ``net.ip`` gives
    the new address.  Returns a line saying what changed."""
    from pyroute2 import IPRoute

    link = next((lk for lk in net.links if {lk.spec.a, lk.spec.b} == {device, src}), None)
    if link is None:
        raise NetworkError(f"{device} has no link to {src}")
    cell_end, dev_end = (link.a, link.b) if link.a.node == src else (link.b, link.a)
    plan = net.plan
    old_seg = plan.link_segment[link.index]
    new_seg = next(s for s in plan.segments if s.cell is not None and dst in _cells_of(net, s))
    used = {a for (_, s), a in plan.addresses.items() if s == new_seg.index}
    new_ip = next(str(a) for a in new_seg.subnet.hosts() if str(a) not in used)
    gateways = [m for m in new_seg.members if net.topo.nodes[m].role != "device" and m != device]
    if not gateways:
        raise NetworkError(f"cell {dst} has no edge host to route through")
    gw = plan.addresses[(gateways[0], new_seg.index)]
    with IPRoute() as ipr:
        port = _bridge_port(ipr, cell_end.ifname, net.backend.joins_in_root)
        (bridge,) = ipr.link_lookup(ifname=net.cells[dst])
        ipr.link("set", index=port, master=bridge)
    dev_if = dev_end.host_if or dev_end.ifname
    old_ip = plan.addresses[(device, old_seg)]
    script = (f"ip addr flush dev {dev_if} && ip addr add {new_ip}/24 dev {dev_if} && "
              f"ip route replace default via {gw} && echo OK")
    out = net.cmd(device, ["sh", "-c", script])
    if "OK" not in out:
        raise NetworkError(f"{device}: re-addressing failed: {' '.join(out.split())[:200]}")
    del plan.addresses[(device, old_seg)]
    plan.addresses[(device, new_seg.index)] = new_ip
    plan.segments[old_seg].members.remove(device)
    new_seg.members.append(device)
    nh, gw_host, k = plan.next_hop, gateways[0], new_seg.index
    # the device reaches its new segment directly and everything else through the new edge; hosts
    # off that segment reach the device the way they reach that edge
    nh[device] = {h: ((h, k) if h in new_seg.members else (gw_host, k)) for h in nh[device]}
    for other in nh:
        if other != device:
            nh[other][device] = (device, k) if other in new_seg.members else nh[other][gw_host]
    return f"{device}: {old_ip} on {src} -> {new_ip} on {dst}, via {gateways[0]} ({gw})"


def _cells_of(net: Any, seg: Any) -> set[str]:
    """The cells of an L2 segment (cells joined by links share one)."""
    return {n for i in seg.links for n in (net.topo.links[i].a, net.topo.links[i].b)
            if net.topo.nodes[n].role == "cell"}


def _bridge_port(ipr: Any, ifname: str, joins_in_root: bool) -> int:
    """The index of the bridge port of a cell end: the end itself (kernel backend), or the veth
    peer of its root port (userspace backend: the link process joins the root port)."""
    (idx,) = ipr.link_lookup(ifname=ifname)
    if not joins_in_root:
        return idx
    peer = ipr.get_links(idx)[0].get_attr("IFLA_LINK")
    if not peer:
        raise NetworkError(f"{ifname}: no veth peer found")
    return int(peer)
