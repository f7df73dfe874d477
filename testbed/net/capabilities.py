"""What the kernel offers for shaping, probed in a scratch namespace, and the choice of backend.

Backend choice (``choose_shaper``):

* ``auto``: ``kernel`` when netem exists, else ``userspace``.
* ``kernel``: HTB + netem.  Without netem it is still accepted when the topology configures
  only rates and queue limits (no delay, jitter, loss or CSV trace): HTB alone shapes those.
  Otherwise it is a ``SpecError`` naming the first field that needs netem.
* ``userspace``: the link process (works everywhere).
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from testbed.net.shaping import kernel as kernel_shaping
from testbed.spec.errors import SpecError
from testbed.spec.options import SHAPERS
from testbed.spec.topology import Topology


@dataclass(frozen=True)
class Capabilities:
    netem: bool
    htb: bool
    tcp_cc_allowed: tuple[str, ...]
    tcp_cc_available: tuple[str, ...]


def _try_qdiscs() -> tuple[bool, bool]:
    """In a fresh namespace (a ``sleep`` held by ``unshare -n``), add a veth and try HTB, netem."""
    holder = subprocess.Popen(["unshare", "-n", "sleep", "30"])
    try:
        ns = f"/proc/{holder.pid}/ns/net"
        # unshare execs sleep once the namespace exists: wait until it differs from ours
        deadline = time.monotonic() + 5
        while os.readlink(ns) == os.readlink("/proc/self/ns/net"):
            if time.monotonic() > deadline or holder.poll() is not None:
                raise RuntimeError("capability probe: could not create a scratch network namespace")
            time.sleep(0.002)
        with kernel_shaping.open_ns(holder.pid) as ipr:
            ipr.link("add", ifname="cap0", kind="veth", peer="cap1")
            idx = ipr.link_lookup(ifname="cap0")[0]
            try:
                ipr.tc("add", "htb", index=idx, handle="1:", default=1)
                ipr.tc("add-class", "htb", index=idx, handle="1:1", parent="1:0",
                       rate="10mbit", ceil="10mbit", quantum=1514)
                htb = True
            except NetlinkError:
                htb = False
            try:
                ipr.tc("add", "netem", index=idx, parent="1:1" if htb else "root", handle="10:",
                       delay=1000)
                netem = True
            except NetlinkError:
                netem = False
        return htb, netem
    finally:
        holder.kill()
        holder.wait()


def _sysctl_list(name: str) -> tuple[str, ...]:
    path = "/proc/sys/" + name.replace(".", "/")
    try:
        with open(path) as f:
            return tuple(f.read().split())
    except OSError:
        return ()


@functools.cache
def probe() -> Capabilities:
    """Probe once per process (the answer does not change while we run)."""
    htb, netem = _try_qdiscs()
    return Capabilities(
        netem=netem,
        htb=htb,
        tcp_cc_allowed=_sysctl_list("net.ipv4.tcp_allowed_congestion_control"),
        tcp_cc_available=_sysctl_list("net.ipv4.tcp_available_congestion_control"),
    )


def netem_fields(topo: Topology) -> list[str]:
    """Fields of the topology that need netem (delay, jitter, loss, CSV trace)."""
    out = []
    for i, link in enumerate(topo.links):
        for direction in ("up", "down"):
            s = getattr(link, direction)
            field = f"links[{i}].{direction}"
            if s.delay_ms:
                out.append(f"{field}.delay_ms")
            if s.jitter_ms:
                out.append(f"{field}.jitter_ms")
            if s.loss_pct:
                out.append(f"{field}.loss_pct")
            if s.trace is not None and (s.format or "mahimahi") == "csv":
                out.append(f"{field}.trace")
    return out


def choose_shaper(requested: str, topo: Topology, caps: Capabilities | None = None) -> str:
    """The backend to use for ``topo``; see the module docstring for the rules."""
    if requested not in SHAPERS:
        raise SpecError(topo.source, "shaper", f"unknown shaper {requested!r} (one of {', '.join(SHAPERS)})")
    if requested == "userspace":
        return "userspace"
    caps = caps or probe()
    if requested == "auto":
        return "kernel" if caps.netem else "userspace"
    if not caps.htb:
        raise SpecError(topo.source, "shaper", "kernel backend needs the HTB qdisc, absent on this kernel")
    if not caps.netem:
        need = netem_fields(topo)
        if need:
            raise SpecError(topo.source, need[0],
                            "needs netem, absent on this kernel: use --shaper userspace (or auto)")
    return "kernel"


def check_tcp_cc(topo: Topology, caps: Capabilities | None = None) -> None:
    """Make sure namespaces may use ``topo.tcp_cc`` (allow it in the root namespace if needed)."""
    caps = caps or probe()
    if topo.tcp_cc in caps.tcp_cc_allowed:
        return
    if topo.tcp_cc not in caps.tcp_cc_available:
        subprocess.run(["modprobe", f"tcp_{topo.tcp_cc}"], capture_output=True)
        if topo.tcp_cc not in _sysctl_list("net.ipv4.tcp_available_congestion_control"):
            raise SpecError(topo.source, "tcp_cc", f"congestion control {topo.tcp_cc!r} not available")
    allowed = " ".join((*_sysctl_list("net.ipv4.tcp_allowed_congestion_control"), topo.tcp_cc))
    with open("/proc/sys/net/ipv4/tcp_allowed_congestion_control", "w") as f:
        f.write(allowed)
    probe.cache_clear()
