"""Kernel shaping of one interface's egress through netlink (pyroute2).

Layout: ``root 1: htb default 1`` -> class ``1:1`` (rate = ceil, quantum 1514) -> child
qdisc ``10:``: netem (delay, jitter, loss, limit) when the kernel has it and they are asked
for, else a pfifo when a queue limit is.  Without a rate the child sits at the root.
"""

from __future__ import annotations

import os

from pyroute2 import IPRoute, netns

from testbed.spec.topology import Shaping

QUANTUM = 1514
MIN_RATE_MBIT = 0.008  # HTB needs a positive rate: a trace bin with no capacity gets this
DEFAULT_LIMIT = 1000


def open_ns(pid: int | None) -> IPRoute:
    """A netlink socket in the network namespace of ``pid`` (None: our own namespace).

    The socket is made while this thread visits the namespace (setns and back, ~2 ms),
    not by pyroute2's ``netns=`` helper, which forks a child per socket (~30 ms)."""
    if pid is None:
        return IPRoute()
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        netns.pushns(fd)
        try:
            return IPRoute()
        finally:
            netns.popns()
    finally:
        os.close(fd)


def _kbit(mbit: float) -> str:
    return f"{int(max(mbit, MIN_RATE_MBIT) * 1e6)}bit"


def needs_shaping(s: Shaping) -> bool:
    return bool(s.bw_mbit is not None or s.trace is not None or s.delay_ms or s.jitter_ms
                or s.loss_pct or s.queue_pkts)


def apply(ipr: IPRoute, ifname: str, s: Shaping, netem: bool, start_mbit: float | None = None) -> int:
    """Shape ``ifname``'s egress as ``s`` says; returns the interface index.

    ``start_mbit`` is the first rate of a trace (the replay thread changes it afterwards).
    """
    idx = ipr.link_lookup(ifname=ifname)[0]
    rate = start_mbit if s.trace is not None else s.bw_mbit
    parent = "root"
    if rate is not None:
        ipr.tc("add", "htb", index=idx, handle="1:", default=1)
        ipr.tc("add-class", "htb", index=idx, handle="1:1", parent="1:0",
               rate=_kbit(rate), ceil=_kbit(rate), quantum=QUANTUM)
        parent = "1:1"
    limit = s.queue_pkts or DEFAULT_LIMIT
    if netem and (s.delay_ms or s.jitter_ms or s.loss_pct or s.format == "csv"):
        ipr.tc("add", "netem", index=idx, parent=parent, handle="10:", limit=limit,
               delay=int(s.delay_ms * 1000), jitter=int(s.jitter_ms * 1000), loss=s.loss_pct)
    elif s.queue_pkts:  # otherwise HTB's default leaf: a pfifo as long as the txqueuelen (1000)
        ipr.tc("add", "pfifo", index=idx, parent=parent, handle="10:", limit=limit)
    return idx


def set_rate(ipr: IPRoute, idx: int, mbit: float) -> None:
    """Change the HTB rate of an interface shaped by ``apply`` (about 1 ms)."""
    ipr.tc("change-class", "htb", index=idx, handle="1:1", parent="1:0",
           rate=_kbit(mbit), ceil=_kbit(mbit), quantum=QUANTUM)


def set_netem(ipr: IPRoute, idx: int, s: Shaping, delay_ms: float, loss_pct: float) -> None:
    """Change the netem child (CSV traces with delay/loss columns)."""
    ipr.tc("change", "netem", index=idx, parent="1:1", handle="10:", limit=s.queue_pkts or DEFAULT_LIMIT,
           delay=int(delay_ms * 1000), jitter=int(s.jitter_ms * 1000), loss=loss_pct)
