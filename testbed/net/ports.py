"""Interfaces of a network: port names, veth pairs, their registration with Mininet.

Host ports are ``<node>-eth<n>`` (``eth<n>`` when that is longer than 15 characters); a cell's
ports and every root-namespace device are ``tb<run><suffix>`` (``naming.device_name``).  veth
pairs are made through netlink, each end created inside its namespace, and registered with
Mininet as interfaces, so the Mininet CLI works as usual.

How a link is wired depends on whether the shaping backend joins the two ends in the root
namespace (``Shaper.joins_in_root``): if not, a link is one veth pair between its nodes (a
cell's end is its bridge port); if so, each end is a veth pair from the node to a root port
``tb<run>l<i>a`` / ``...b``.
"""

from __future__ import annotations

from mininet.link import Intf
from pyroute2 import IPRoute

from testbed.net.addressing import AddressPlan
from testbed.net.naming import RunState, device_name
from testbed.net.shaping.link import Link, LinkEnd
from testbed.spec.topology import LinkSpec

IFNAMSIZ = 15


def _no_move(*_args, **_kw) -> None:
    """Interfaces are created inside their namespace already."""


class Ports:
    """Makes the interfaces of one run and remembers the root-namespace ones (for teardown)."""

    def __init__(self, mn, run_id: str, cells: dict[str, str], plan: AddressPlan, state: RunState) -> None:
        self.mn = mn
        self.run_id = run_id
        self.cells = cells  # cell name -> bridge name
        self.plan = plan
        self.state = state
        self.root_devices: list[str] = []  # root-namespace ports, brought up after Mininet starts

    def new_port(self, node: str) -> tuple[str, object, int]:
        """Next interface of ``node``: (name, Mininet node, port number)."""
        mnode = self.mn.nameToNode[self.cells.get(node, node)]
        port = mnode.newPort()
        if node in self.cells:
            k = list(self.cells).index(node)
            return device_name(self.run_id, f"c{k}p{port}"), mnode, port
        name = f"{node}-eth{port}"
        return (name if len(name) <= IFNAMSIZ else f"eth{port}"), mnode, port

    def register(self, name: str, mnode, port: int, node: str, segment: int) -> None:
        intf = Intf(name, node=mnode, port=port, moveIntfFn=_no_move, up=None)
        if node not in self.cells:
            intf.ip, intf.prefixLen = self.plan.address(node, segment), 24
        else:
            self.root_devices.append(name)
            self.state.add("interfaces", name)

    @staticmethod
    def veth(ipr: IPRoute, name_a: str, pid_a: int | None, name_b: str, pid_b: int | None) -> None:
        peer: dict = {"ifname": name_b}
        if pid_b is not None:
            peer["net_ns_pid"] = pid_b
        kw = {"net_ns_pid": pid_a} if pid_a is not None else {}
        ipr.link("add", ifname=name_a, kind="veth", peer=peer, **kw)

    def wire(self, ipr: IPRoute, i: int, link: LinkSpec, joins_in_root: bool) -> Link:
        """Make link ``i``'s interfaces; the ends the shaping backend works on."""
        seg = self.plan.link_segment[i]
        if not joins_in_root:
            (na, ma, pa), (nb, mb, pb) = self.new_port(link.a), self.new_port(link.b)
            pid_a = None if link.a in self.cells else ma.pid
            pid_b = None if link.b in self.cells else mb.pid
            for name, pid in ((na, pid_a), (nb, pid_b)):
                if pid is None:
                    self.state.add("interfaces", name)
            self.veth(ipr, na, pid_a, nb, pid_b)
            self.register(na, ma, pa, link.a, seg)
            self.register(nb, mb, pb, link.b, seg)
            return Link(i, link, LinkEnd(link.a, na, pid_a), LinkEnd(link.b, nb, pid_b))
        ends = []
        for side, node in (("a", link.a), ("b", link.b)):
            name, mnode, port = self.new_port(node)
            root_port = device_name(self.run_id, f"l{i}{side}")
            self.state.add("interfaces", root_port)
            pid = None if node in self.cells else mnode.pid
            self.veth(ipr, root_port, None, name, pid)
            self.root_devices.append(root_port)
            self.register(name, mnode, port, node, seg)
            ends.append(LinkEnd(node, root_port, pid, name if pid is not None else None))
        return Link(i, link, ends[0], ends[1])

    def bring_up_root_devices(self) -> None:
        with IPRoute() as ipr:
            for name in self.root_devices:
                ipr.link("set", ifname=name, state="up")
