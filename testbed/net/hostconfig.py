"""Configuring the hosts of a network: one shell line per host (sysctls, addresses, routes),
sent to every host's shell at once and collected after."""

from __future__ import annotations

import shlex

from testbed.net.addressing import AddressPlan


def host_script(host, plan: AddressPlan, tcp_cc: str) -> str:
    """One shell line configuring Mininet host ``host``: sysctls, addresses, links up, routes.

    A failing command prints ``TBERR: <command>`` and the line goes on (all errors are seen)."""
    sysctls = ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
               "net.ipv4.conf.default.rp_filter=0", f"net.ipv4.tcp_congestion_control={tcp_cc}"]
    cmds = ["sysctl -qw " + " ".join(sysctls), "ip link set lo up"]
    for intf in host.intfList():
        if intf.name == "lo":
            continue
        cmds.append(f"ip addr add {intf.ip}/24 dev {intf.name}")
        cmds.append(f"ip link set {intf.name} up")
    for subnet, gw in plan.routes.get(host.name, []):
        cmds.append(f"ip route add {subnet} via {gw}")
    return "; ".join(f"{c} || echo TBERR: {shlex.quote(c)}" for c in cmds)


def configure_hosts(hosts: list, plan: AddressPlan, tcp_cc: str) -> None:
    """Configure every host at once; RuntimeError listing the first failed commands."""
    for h in hosts:
        h.sendCmd(host_script(h, plan, tcp_cc))
    errors = []
    for h in hosts:
        out = h.waitOutput()
        errors += [f"{h.name}: {line}" for line in out.splitlines() if "TBERR" in line]
    if errors:
        raise RuntimeError("host configuration failed: " + "; ".join(errors[:5]))
