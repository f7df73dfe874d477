"""``EmulatedNetwork``: a topology brought up with Mininet, shaped, addressed and routed.

Hosts are Mininet hosts (``testbed.hosts.factory.host_class``), cells are ``LinuxBridge``
switches named ``tb<run><c#>``.  The parts, one module each:

* ``ports``: interface names, veth pairs, their registration with Mininet;
* ``hostconfig``: the shell line that configures each host (sysctls, addresses, routes);
* ``shaping``: one ``Shaper`` backend object (kernel or userspace) shapes every link;
* ``watchdog``: checks the backend while the network runs; a failure (a link process dead,
  trace replay stopped) is kept, told to ``on_failure`` callbacks and raised by ``check()``;
* ``hostwide``: host-wide settings the run changes, recorded and put back;
* ``teardown``: processes, devices, shells, cgroups; signals held while it runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TextIO

from mininet.log import setLogLevel
from mininet.net import Mininet
from mininet.nodelib import LinuxBridge
from pyroute2 import IPRoute

from testbed.hosts.factory import host_class
from testbed.hosts.process_host import remove_run_cgroups
from testbed.net import addressing, capabilities, hostwide
from testbed.net.errors import NetworkError
from testbed.net.hostconfig import configure_hosts
from testbed.net.naming import (
    ENV_MARKER,
    STATE_DIR,
    RunState,
    alive,
    device_name,
    hand_over,
    load_states,
    new_run_id,
)
from testbed.net.ports import Ports
from testbed.net.shaping import Link, Shaper, make_shaper
from testbed.net.teardown import (
    delete_devices,
    kill_and_wait,
    kill_namespace_processes,
    signals_deferred,
    terminate_nodes,
)
from testbed.net.watchdog import Watchdog
from testbed.spec.topology import Shaping, Topology

__all__ = ["EmulatedNetwork", "NetworkError", "kill_and_wait"]


class EmulatedNetwork:
    """A running emulated topology; use as a context manager or call ``start``/``stop``.

    ``on_failure`` (optional) is called from the watchdog thread with the ``NetworkError`` when
    a part of the running network fails; ``check()`` raises it in the caller's thread, and
    leaving the ``with`` block raises it too when nothing else went wrong."""

    def __init__(self, topo: Topology, shaper: str = "auto", runtime: str | None = None, *,
                 cli_log: TextIO | None = None,
                 on_failure: Callable[[NetworkError], None] | None = None) -> None:
        self.topo = topo
        self.runtime = runtime
        self.log = cli_log
        self.shaper = capabilities.choose_shaper(shaper, topo)  # the backend's name
        self.tcp_cc = topo.tcp_cc
        self.plan = addressing.plan(topo)
        self.run_id = new_run_id()
        self.state = RunState(self.run_id)
        self.mn: Mininet | None = None
        self.cells: dict[str, str] = {}  # cell name -> bridge name
        self.links: list[Link] = []
        self.backend: Shaper | None = None
        self._ports: Ports | None = None
        self._popens: list[subprocess.Popen] = []
        self._watchdog: Watchdog | None = None
        self._on_failure = [on_failure] if on_failure is not None else []
        self._old_sigterm = None
        self._stopped = True
        self._owner_pid = os.getpid()

    # --- public API ------------------------------------------------------------------

    def __enter__(self) -> EmulatedNetwork:
        self.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if exc_type is None:
            self.check()  # the run "succeeded" over a network that broke: say so

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
        """Tear down (SIGINT/SIGTERM held until done): watchdog, shaping, processes, devices,
        shells, cgroups, host-wide settings, state."""
        if self._stopped or os.getpid() != self._owner_pid:
            return
        self._stopped = True
        try:
            with signals_deferred():
                self._teardown()
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None

    def check(self) -> None:
        """Raise ``NetworkError`` (naming the link) if a part of the network has failed."""
        if self._watchdog is not None and self._watchdog.failure is not None:
            raise self._watchdog.failure
        if self.backend is not None and not self._stopped:
            try:
                self.backend.check()
            except NetworkError as e:
                if self._watchdog is not None:
                    self._watchdog.fail(e)
                raise

    def on_failure(self, callback: Callable[[NetworkError], None]) -> None:
        """Also call ``callback(error)`` (from the watchdog thread) when a part fails."""
        self._on_failure.append(callback)
        if self._watchdog is not None:
            self._watchdog.callbacks.append(callback)

    def update_link(self, a: str, b: str, up: Shaping | None = None, down: Shaping | None = None) -> None:
        """Change the shaping of the link between ``a`` and ``b`` while the network runs
        (``up`` is a -> b as the topology lists the link)."""
        assert self.backend is not None
        for link in self.links:
            if (link.spec.a, link.spec.b) == (a, b):
                self.backend.update(link, up, down)
                return
            if (link.spec.a, link.spec.b) == (b, a):
                self.backend.update(link, down, up)
                return
        raise KeyError(f"no link {a}<->{b} in this network")

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
        return self.backend.trace_t0 if self.backend is not None else None

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

    def _host_wide_settings(self) -> None:
        changed = hostwide.bridge_nf_off()
        for key in changed:
            self._say(f"*** set {key}=0 (bridged frames would be dropped by Docker's FORWARD policy)")
        self.state.set_host_settings(changed, {"bridge_nf_off": True})
        changed = hostwide.allowed_tcp_cc(lambda: capabilities.check_tcp_cc(self.topo))
        self.state.set_host_settings(changed, {"tcp_cc": self.tcp_cc})

    def _build(self) -> None:
        t0 = time.monotonic()
        self.state.mark_environment()
        self.state.write()  # first: what follows changes the host, the record must exist
        self._host_wide_settings()
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
        self.backend = make_shaper(self.shaper, on_started=lambda pid: self.state.add("link_pids", pid))
        self._ports = Ports(self.mn, self.run_id, self.cells, self.plan, self.state)
        with IPRoute() as ipr:
            for i, link in enumerate(self.topo.links):
                self.links.append(self._ports.wire(ipr, i, link, self.backend.joins_in_root))
        self.mn.build()
        configure_hosts([self._host(h.name) for h in self.topo.hosts()], self.plan, self.tcp_cc)
        self.mn.start()  # creates the bridges and attaches their ports
        self._ports.bring_up_root_devices()
        self.backend.apply_all(self.links)
        self._watchdog = Watchdog(self.backend.check)
        self._watchdog.callbacks.extend(self._on_failure)
        self._watchdog.start()
        self._say(f"*** {len(self.topo.hosts())} hosts, {len(cells)} cells, {len(self.topo.links)} links up "
                  f"in {time.monotonic() - t0:.1f} s; shaper: {self.shaper}; tcp_cc: {self.tcp_cc}; "
                  f"run {self.run_id}")

    # --- teardown ----------------------------------------------------------------------

    def _teardown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
        if self.backend is not None:
            self.backend.close()
        mn = self.mn
        hosts = [mn.nameToNode[h.name] for h in self.topo.hosts() if mn and h.name in mn.nameToNode]
        kill_namespace_processes(hosts, exclude={os.getpid()})
        for p in self._popens:
            try:
                p.poll()
            except Exception:  # noqa: BLE001,S112 - reaping only; the process is gone either way
                continue
        root_devices = self._ports.root_devices if self._ports is not None else []
        delete_devices([*root_devices, *self.cells.values()])
        if mn is not None:
            terminate_nodes(mn, hosts)
            for h in hosts:
                if hasattr(h, "remove_cgroups"):
                    h.remove_cgroups()
            remove_run_cgroups(self.run_id)
        self._restore_host_wide_settings()
        self.state.remove()
        self._say(f"*** run {self.run_id} torn down")

    def _restore_host_wide_settings(self) -> None:
        changed = self.state.host_settings_changed()
        if not changed:
            return
        others = [s for s in load_states() if s.get("run_id") != self.run_id and alive(s.get("owner_pid"))]
        needs = [s.get("host_settings", {}).get("needs", {}) for s in others]

        def give(key: str, value: str) -> None:
            hand_over(STATE_DIR / f"{others[0]['run_id']}.json", key, value)

        for done in hostwide.restore(changed, needs, give if others else None):
            self._say(f"*** restored {done}")
