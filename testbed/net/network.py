"""``EmulatedNetwork``: a topology brought up with Mininet, shaped, addressed and routed.

Hosts are Mininet hosts (``testbed.hosts.factory.host_class``), cells are ``LinuxBridge``
switches named ``tb<run><c#>``; veth pairs are made through netlink (pyroute2) and
registered with Mininet as interfaces, so the Mininet CLI works as usual.

* kernel backend: a host-host link is one veth pair; the a-end egress is shaped with ``up``,
  the b-end egress with ``down`` (HTB + netem/pfifo, ``kernel_shaping``); a cell's end is its
  bridge port in the root namespace.
* userspace backend: each link end gets a veth pair whose root-namespace side
  (``tb<run>l<i>a`` / ``...b``) is joined to the other by the link process
  (``testbed.net.shaping.userspace``); offloads are off on the host-side ends.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TextIO

from mininet.link import Intf
from mininet.log import setLogLevel
from mininet.net import Mininet
from mininet.nodelib import LinuxBridge
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.hosts.factory import host_class
from testbed.hosts.process_host import remove_run_cgroups
from testbed.net import addressing, capabilities
from testbed.net.naming import ENV_MARKER, RunState, device_name, new_run_id
from testbed.net.shaping import kernel as kernel_shaping
from testbed.spec.topology import Shaping, Topology

BRIDGE_NF = ("iptables", "ip6tables", "arptables")
PARALLEL = 8  # link processes started / stopped at once


def _no_move(*_args, **_kw) -> None:
    """Interfaces are created inside their namespace already."""


@dataclass
class LinkEnd:
    node: str  # topology node name (host or cell)
    ifname: str  # the interface carrying this end's egress traffic
    pid: int | None  # namespace holder, None for the root namespace
    host_if: str | None = None  # userspace backend: the interface inside the host


def ensure_bridge_nf_off() -> list[str]:
    """Docker's FORWARD DROP with bridge netfilter drops bridged frames: switch it off.

    Returns the sysctls that had to be changed."""
    changed = []
    for f in BRIDGE_NF:
        path = f"/proc/sys/net/bridge/bridge-nf-call-{f}"
        with contextlib.suppress(OSError):
            with open(path) as fh:
                if fh.read().strip() == "0":
                    continue
            with open(path, "w") as fh:
                fh.write("0")
            changed.append(f"net.bridge.bridge-nf-call-{f}=0")
    return changed


def netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def pids_in_netns(inodes: set[int], exclude: set[int]) -> list[int]:
    """Processes whose network namespace is one of ``inodes``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in exclude:
            ino = netns_inode(int(entry))
            if ino in inodes:
                out.append(int(entry))
    return out


def kill_and_wait(pids: list[int], grace_s: float = 0.5) -> None:
    """SIGTERM, then SIGKILL whatever is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if os.path.exists(f"/proc/{p}") and not _is_zombie(p)]
            if pids:
                time.sleep(0.02)
        if not pids:
            return


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class EmulatedNetwork:
    """A running emulated topology; use as a context manager or call ``start``/``stop``."""

    def __init__(self, topo: Topology, shaper: str = "auto", runtime: str | None = None, *,
                 cli_log: TextIO | None = None) -> None:
        self.topo = topo
        self.runtime = runtime
        self.log = cli_log
        self.shaper = capabilities.choose_shaper(shaper, topo)
        self.tcp_cc = topo.tcp_cc
        self.plan = addressing.plan(topo)
        self.run_id = new_run_id()
        self.state = RunState(self.run_id)
        self.mn: Mininet | None = None
        self.cells: dict[str, str] = {}  # cell name -> bridge name
        self.ends: list[tuple[LinkEnd, LinkEnd]] = []
        self.root_devices: list[str] = []
        self._link_procs: list[subprocess.Popen] = []
        self._popens: list[subprocess.Popen] = []
        self._iprs: dict[int | None, IPRoute] = {}
        self._replayer = None
        self._old_sigterm = None
        self._stopped = True
        self._owner_pid = os.getpid()

    # --- public API ------------------------------------------------------------------

    def __enter__(self) -> EmulatedNetwork:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Bring everything up; on any failure tear down what exists and re-raise."""
        self._stopped = False
        self._owner_pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._build()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Tear down: replay thread, link processes, host processes, devices, shells, state."""
        if self._stopped or os.getpid() != self._owner_pid:
            return
        self._stopped = True
        try:
            self._teardown()
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None

    def ip(self, node: str, peer: str | None = None) -> str:
        """``node``'s address (on the segment facing ``peer`` when given)."""
        return self.plan.ip(node, peer)

    def popen(self, node: str, argv: list[str], **kw) -> subprocess.Popen:
        """Run ``argv`` inside ``node`` (stdout/stderr default to pipes, as in Mininet)."""
        env = kw.get("env")
        if env is not None and ENV_MARKER not in env:
            kw["env"] = {**env, ENV_MARKER: self.run_id}
        p = self._host(node).popen(list(argv), **kw)
        self._popens.append(p)
        return p

    def cmd(self, node: str, argv: list[str]) -> str:
        """Run ``argv`` inside ``node`` to completion; its stdout and stderr together."""
        p = self.popen(node, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = p.communicate()
        return out

    def runner(self, node: str) -> Callable[[list[str]], subprocess.Popen]:
        """A runner for ``testbed.net.probe``: argv -> Popen inside ``node``."""
        return lambda argv, **kw: self.popen(node, argv, **kw)

    @property
    def trace_t0(self) -> float | None:
        """``time.monotonic()`` at which kernel trace replay began (bin 0), None without traces."""
        return self._replayer.t0 if self._replayer is not None else None

    def pid(self, node: str) -> int:
        """PID of the process holding ``node``'s namespaces (its shell)."""
        return self._host(node).pid

    # --- bring-up ----------------------------------------------------------------------

    def _say(self, msg: str) -> None:
        if self.log is not None:
            print(msg, file=self.log, flush=True)

    def _on_sigterm(self, signum, frame) -> None:
        if os.getpid() != self._owner_pid:
            # a forked helper (pyroute2 opens namespace sockets that way) inherited this
            # handler: it must die quietly, never unwind into our teardown
            os._exit(128 + signum)
        raise SystemExit(128 + signum)

    def _host(self, node: str):
        if self.mn is None or node not in self.topo.nodes or self.topo.nodes[node].role == "cell":
            raise KeyError(f"no host {node!r} in this network")
        return self.mn.nameToNode[node]

    def _build(self) -> None:
        capabilities.warn_over_ceiling(self.topo, self.shaper)  # before anything runs: it may measure
        t0 = time.monotonic()
        for change in ensure_bridge_nf_off():
            self._say(f"*** set {change} (bridged frames would be dropped by Docker's FORWARD policy)")
        capabilities.check_tcp_cc(self.topo)
        self.state.mark_environment()
        self.state.write()
        setLogLevel("error")
        self.mn = Mininet(topo=None, switch=LinuxBridge, controller=None, build=False,
                          autoSetMacs=False, inNamespace=False)
        for spec in self.topo.hosts():
            cls, params = host_class(spec, self.runtime)
            h = self.mn.addHost(spec.name, cls=cls, ip=None, run_id=self.run_id, **params)
            self.state.set_host_pid(spec.name, h.pid)
            for d in getattr(h, "cgroups", []):
                self.state.add("cgroups", str(d))
        cells = [n for n in self.topo.nodes.values() if n.role == "cell"]
        for k, cell in enumerate(cells):
            br = device_name(self.run_id, f"c{k}")
            self.mn.addSwitch(br, cls=LinuxBridge)
            self.cells[cell.name] = br
            self.state.add("bridges", br)
        with IPRoute() as ipr:
            for i in range(len(self.topo.links)):
                self.ends.append(self._make_link(ipr, i))
        self.mn.build()
        self._configure_hosts()
        self.mn.start()  # creates the bridges and attaches their ports
        self._bring_root_devices_up()
        if self.shaper == "kernel":
            self._shape_kernel()
        else:
            self._start_link_processes()
        self._say(f"*** {len(self.topo.hosts())} hosts, {len(cells)} cells, {len(self.topo.links)} links up "
                  f"in {time.monotonic() - t0:.1f} s; shaper: {self.shaper}; tcp_cc: {self.tcp_cc}; "
                  f"run {self.run_id}")

    def _new_port(self, node: str) -> tuple[str, object, int]:
        """Next interface of ``node``: (name, Mininet node, port number)."""
        mnode = self.mn.nameToNode[self.cells.get(node, node)]
        port = mnode.newPort()
        if node in self.cells:
            k = list(self.cells).index(node)
            return device_name(self.run_id, f"c{k}p{port}"), mnode, port
        name = f"{node}-eth{port}"
        return (name if len(name) <= 15 else f"eth{port}"), mnode, port

    def _register(self, name: str, mnode, port: int, node: str, segment: int) -> None:
        intf = Intf(name, node=mnode, port=port, moveIntfFn=_no_move, up=None)
        if node not in self.cells:
            intf.ip, intf.prefixLen = self.plan.address(node, segment), 24
        else:
            self.root_devices.append(name)
            self.state.add("interfaces", name)

    def _veth(self, ipr: IPRoute, name_a: str, pid_a: int | None, name_b: str, pid_b: int | None) -> None:
        peer: dict = {"ifname": name_b}
        if pid_b is not None:
            peer["net_ns_pid"] = pid_b
        kw = {"net_ns_pid": pid_a} if pid_a is not None else {}
        ipr.link("add", ifname=name_a, kind="veth", peer=peer, **kw)

    def _make_link(self, ipr: IPRoute, i: int) -> tuple[LinkEnd, LinkEnd]:
        link = self.topo.links[i]
        seg = self.plan.link_segment[i]
        ends = []
        if self.shaper == "kernel":
            (na, ma, pa), (nb, mb, pb) = self._new_port(link.a), self._new_port(link.b)
            pid_a = None if link.a in self.cells else ma.pid
            pid_b = None if link.b in self.cells else mb.pid
            if pid_a is None:
                self.state.add("interfaces", na)
            if pid_b is None:
                self.state.add("interfaces", nb)
            self._veth(ipr, na, pid_a, nb, pid_b)
            self._register(na, ma, pa, link.a, seg)
            self._register(nb, mb, pb, link.b, seg)
            return LinkEnd(link.a, na, pid_a), LinkEnd(link.b, nb, pid_b)
        for side, node in (("a", link.a), ("b", link.b)):
            name, mnode, port = self._new_port(node)
            root_port = device_name(self.run_id, f"l{i}{side}")
            self.state.add("interfaces", root_port)
            pid = None if node in self.cells else mnode.pid
            self._veth(ipr, root_port, None, name, pid)
            self.root_devices.append(root_port)
            self._register(name, mnode, port, node, seg)
            ends.append(LinkEnd(node, root_port, pid, name if pid is not None else None))
        return ends[0], ends[1]

    def _host_script(self, host: str) -> str:
        """One shell line configuring a host: sysctls, addresses, links up, routes."""
        sysctls = ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                   "net.ipv4.conf.default.rp_filter=0", f"net.ipv4.tcp_congestion_control={self.tcp_cc}"]
        cmds = ["sysctl -qw " + " ".join(sysctls), "ip link set lo up"]
        for intf in self._host(host).intfList():
            if intf.name == "lo":
                continue
            cmds.append(f"ip addr add {intf.ip}/24 dev {intf.name}")
            cmds.append(f"ip link set {intf.name} up")
        for subnet, gw in self.plan.routes.get(host, []):
            cmds.append(f"ip route add {subnet} via {gw}")
        return "; ".join(f"{c} || echo TBERR: {shlex.quote(c)}" for c in cmds)

    def _configure_hosts(self) -> None:
        """Configure every host at once (commands sent to all shells, then collected)."""
        hosts = [h.name for h in self.topo.hosts()]
        for h in hosts:
            self._host(h).sendCmd(self._host_script(h))
        errors = []
        for h in hosts:
            out = self._host(h).waitOutput()
            errors += [f"{h}: {line}" for line in out.splitlines() if "TBERR" in line]
        if errors:
            raise RuntimeError("host configuration failed: " + "; ".join(errors[:5]))

    def _bring_root_devices_up(self) -> None:
        with IPRoute() as ipr:
            for name in self.root_devices:
                ipr.link("set", ifname=name, state="up")

    def _ipr(self, pid: int | None) -> IPRoute:
        if pid not in self._iprs:
            self._iprs[pid] = kernel_shaping.open_ns(pid)
        return self._iprs[pid]

    def _shape_kernel(self) -> None:
        netem = capabilities.probe().netem
        for (end_a, end_b), link in zip(self.ends, self.topo.links, strict=True):
            for end, shaping in ((end_a, link.up), (end_b, link.down)):
                if kernel_shaping.needs_shaping(shaping):
                    self._shape_end(end, shaping, netem)
        if self._replayer is not None:
            self._replayer.start()

    def _shape_end(self, end: LinkEnd, s: Shaping, netem: bool) -> None:
        ipr = self._ipr(end.pid)
        if s.trace is None:
            kernel_shaping.apply(ipr, end.ifname, s, netem)
            return
        from testbed.net.trace_replay import TraceReplayer
        from testbed.spec.traces import load_trace

        trace = load_trace(s.trace, s.format or "mahimahi")
        idx = kernel_shaping.apply(ipr, end.ifname, s, netem, start_mbit=float(trace.rate_bins_mbit(100)[0]))
        if self._replayer is None:
            self._replayer = TraceReplayer()
        self._replayer.add(end.pid, idx, s, trace, netem)

    def _start_link_processes(self) -> None:
        """Offloads off on the host-side ends, then one link process per link (in parallel:
        each one is a Python start-up that waits until its sockets are bound)."""
        from testbed.net.offload import disable_offloads
        from testbed.net.shaping.userspace import start_link_process

        host_ends = [e for pair in self.ends for e in pair if e.host_if is not None]
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(lambda e: disable_offloads(e.host_if, pid=e.pid), host_ends))
            futures = [pool.submit(start_link_process, a.ifname, b.ifname, link.up, link.down)
                       for (a, b), link in zip(self.ends, self.topo.links, strict=True)]
            for f in futures:
                try:
                    p = f.result()
                except Exception:
                    for g in futures:  # keep the ones that did start, for teardown
                        if g.done() and g.exception() is None and g.result() not in self._link_procs:
                            self._link_procs.append(g.result())
                    raise
                self._link_procs.append(p)
                self.state.add("link_pids", p.pid)

    # --- teardown ----------------------------------------------------------------------

    def _teardown(self) -> None:
        if self._replayer is not None:
            self._replayer.stop()
        if self._link_procs:
            from testbed.net.shaping.userspace import stop_link_process

            def stop(p: subprocess.Popen) -> None:
                with contextlib.suppress(Exception):
                    stop_link_process(p)

            with ThreadPoolExecutor(PARALLEL) as pool:
                list(pool.map(stop, self._link_procs))
        for ipr in self._iprs.values():
            with contextlib.suppress(Exception):
                ipr.close()
        self._iprs.clear()
        mn = self.mn
        hosts = [mn.nameToNode[h.name] for h in self.topo.hosts() if mn and h.name in mn.nameToNode]
        shells = {h.pid for h in hosts if h.pid}
        inodes = {i for i in (netns_inode(p) for p in shells) if i is not None}
        me = os.getpid()
        kill_and_wait(pids_in_netns(inodes, exclude=shells | {me}) + [p.pid for p in self._link_procs])
        for p in self._popens + self._link_procs:
            with contextlib.suppress(Exception):
                p.poll()
        with IPRoute() as ipr:
            for name in [*self.root_devices, *self.cells.values()]:
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", ifname=name)
        if mn is not None:
            for node in mn.switches + hosts:
                node.waitExited = False
                with contextlib.suppress(Exception):
                    node.terminate()
            kill_and_wait([p for p in shells if os.path.exists(f"/proc/{p}")], grace_s=1.0)
            for h in hosts:
                if hasattr(h, "remove_cgroups"):
                    h.remove_cgroups()
            remove_run_cgroups(self.run_id)
        self.state.remove()
        self._say(f"*** run {self.run_id} torn down")

