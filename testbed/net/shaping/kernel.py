"""Kernel shaping of one interface's egress through netlink (pyroute2), and the kernel backend.

Layout of a shaped interface:

* a rate (or a trace): ``root 1: htb default 1`` with a size table that takes the 14-byte
  Ethernet header off every packet (rates count IP bytes, as the link process does) ->
  class ``1:1`` (rate = ceil) -> child qdisc ``10:``;
* child ``10:``: netem (delay, jitter, loss) when the kernel has it and one of them is asked
  for, else a pfifo of ``queue_pkts`` packets;
* no rate: the child sits at the root.

netem's ``limit`` counts every packet it holds, those waiting out their delay too; it is set to
``queue_pkts`` plus the full-size packets the link carries during ``delay + jitter``, so that
``queue_pkts`` bounds only the packets waiting for the rate (as on the userspace backend).
With jitter, netem gets a ``rate`` far above the link's: a netem with a rate never sends a
packet before the one queued ahead of it, so jitter does not reorder packets.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import threading

from pyroute2 import IPRoute, netns
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWQDISC
from pyroute2.netlink.rtnl.tcmsg import sched_netem, tcmsg

from testbed.spec.topology import Shaping

QUANTUM = 1514
MIN_RATE_MBIT = 0.008  # HTB needs a positive rate: a trace bin with no capacity gets this
DEFAULT_QUEUE_PKTS = 1000
DEFAULT_LIMIT = DEFAULT_QUEUE_PKTS  # the name older callers know
ETH_HLEN = 14
FULL_PACKET_BYTES = 1500  # IP bytes of a full-size packet: what the delay allowance counts
UNSHAPED_MBIT = 10_000  # no rate: the delay allowance is sized as if the link carried 10 Gbit/s
ORDER_RATE = "32gbit"  # netem rate that only keeps packets in order (0.4 us per 1500 bytes)
ROOT_HANDLE = 0x10000  # 1:
NETEM_HANDLE = 0x100000  # 10:
CLASS_1_1 = 0x10001  # 1:1
TC_H_ROOT = 0xFFFFFFFF
TCA_STAB_BASE = 1


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


class NetlinkSockets:
    """Netlink sockets per (thread, namespace): pyroute2 binds a socket to the thread that made it."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()

    def get(self, pid: int | None) -> IPRoute:
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = {}
        if pid not in cache:
            cache[pid] = open_ns(pid)
        return cache[pid]

    def close_mine(self) -> None:
        """Close the calling thread's sockets."""
        for ipr in getattr(self._local, "cache", {}).values():
            with contextlib.suppress(Exception):
                ipr.close()
        self._local.cache = {}


def _bit(mbit: float) -> str:
    return f"{int(max(mbit, MIN_RATE_MBIT) * 1e6)}bit"


def needs_shaping(s: Shaping) -> bool:
    return bool(s.bw_mbit is not None or s.trace is not None or s.delay_ms or s.jitter_ms
                or s.loss_pct or s.queue_pkts)


def wants_netem(s: Shaping) -> bool:
    return bool(s.delay_ms or s.jitter_ms or s.loss_pct or s.format == "csv")


def netem_limit(queue_pkts: int | None, rate_mbit: float | None, delay_ms: float, jitter_ms: float) -> int:
    """netem's limit: the rate queue plus the full-size packets in flight during the delay."""
    mbit = rate_mbit if rate_mbit is not None else UNSHAPED_MBIT
    in_delay = math.ceil(mbit * 1e6 / 8 * (delay_ms + jitter_ms) / 1000 / FULL_PACKET_BYTES)
    return (queue_pkts or DEFAULT_QUEUE_PKTS) + in_delay


def _netem_args(s: Shaping, rate_mbit: float | None, delay_ms: float, loss_pct: float) -> dict:
    args = {"limit": netem_limit(s.queue_pkts, rate_mbit, delay_ms, s.jitter_ms),
            "delay": int(delay_ms * 1000), "jitter": int(s.jitter_ms * 1000), "loss": loss_pct}
    if s.jitter_ms:
        args["rate"] = ORDER_RATE
    return args


def _netem(ipr: IPRoute, command: str, idx: int, parent: int, args: dict) -> None:
    """Add or change the netem qdisc ``10:``.

    Sent as a message of our own: ``ipr.tc(..., rate=...)`` also turns ``rate`` into the qdisc's
    ``TCA_RATE`` (an estimator), which the kernel refuses."""
    msg = tcmsg()
    msg["index"] = idx
    msg["handle"] = NETEM_HANDLE
    msg["parent"] = parent
    msg["attrs"] = [("TCA_KIND", "netem"), ("TCA_OPTIONS", sched_netem.get_parameters(args))]
    msg["header"]["type"] = RTM_NEWQDISC
    flags = NLM_F_CREATE | NLM_F_EXCL if command == "add" else NLM_F_REPLACE
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
    ipr.nlm_request_batch([msg])


def set_ip_bytes(ipr: IPRoute, idx: int) -> None:
    """A size table on the root HTB that counts each packet 14 bytes short: its IP bytes.

    pyroute2 has no encoder for ``TCA_STAB``: the attribute (``TCA_STAB_BASE``, a
    ``struct tc_sizespec`` with overhead -14 and no table) is packed here and sent as a qdisc change."""
    sizespec = struct.pack("=BBhiIIII", 0, 0, 0, -ETH_HLEN, 0, 0, 0, 0)
    msg = tcmsg()
    msg["index"] = idx
    msg["handle"] = ROOT_HANDLE
    msg["parent"] = TC_H_ROOT
    msg["attrs"] = [("TCA_KIND", "htb"), ("TCA_STAB", struct.pack("=HH", 4 + len(sizespec), TCA_STAB_BASE)
                                         + sizespec)]
    msg["header"]["type"] = RTM_NEWQDISC
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    ipr.nlm_request_batch([msg])


def apply(ipr: IPRoute, ifname: str, s: Shaping, netem: bool, start_mbit: float | None = None) -> int:
    """Shape ``ifname``'s egress as ``s`` says; returns the interface index.

    ``start_mbit`` is the first rate of a trace (the replay thread changes it afterwards).
    """
    idx = ipr.link_lookup(ifname=ifname)[0]
    rate = start_mbit if s.trace is not None else s.bw_mbit
    parent = TC_H_ROOT  # pyroute2 takes no "root" name for a parent
    if rate is not None:
        ipr.tc("add", "htb", index=idx, handle="1:", default=1)
        set_ip_bytes(ipr, idx)
        ipr.tc("add-class", "htb", index=idx, handle="1:1", parent="1:0",
               rate=_bit(rate), ceil=_bit(rate), quantum=QUANTUM)
        parent = CLASS_1_1
    if netem and wants_netem(s):
        _netem(ipr, "add", idx, parent, _netem_args(s, rate, s.delay_ms, s.loss_pct))
    elif s.queue_pkts:  # otherwise HTB's default leaf: a pfifo as long as the txqueuelen (1000)
        ipr.tc("add", "pfifo", index=idx, parent=parent, handle="10:", limit=s.queue_pkts)
    return idx


def set_rate(ipr: IPRoute, idx: int, mbit: float) -> None:
    """Change the HTB rate of an interface shaped by ``apply`` (about 1 ms)."""
    ipr.tc("change-class", "htb", index=idx, handle="1:1", parent="1:0",
           rate=_bit(mbit), ceil=_bit(mbit), quantum=QUANTUM)


def set_netem(ipr: IPRoute, idx: int, s: Shaping, delay_ms: float, loss_pct: float,
              rate_mbit: float | None = None) -> None:
    """Change the netem child: delay and loss (CSV trace steps), and its limit for ``rate_mbit``."""
    parent = CLASS_1_1 if rate_mbit is not None else TC_H_ROOT
    _netem(ipr, "change", idx, parent, _netem_args(s, rate_mbit, delay_ms, loss_pct))


def remove(ipr: IPRoute, ifname: str) -> None:
    """Take every qdisc off ``ifname`` (the interface keeps its default); gone already is fine."""
    with contextlib.suppress(NetlinkError, IndexError):
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.tc("del", index=idx, parent=TC_H_ROOT)
