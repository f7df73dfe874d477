"""Tearing a network down: the processes in its namespaces, its devices, its shells, its cgroups.

``signals_deferred`` holds SIGINT and SIGTERM while a teardown runs, so a second Ctrl-C cannot
stop it halfway (the signal is delivered once the teardown is over).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

DEFERRED = (signal.SIGINT, signal.SIGTERM)


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


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


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


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the duration; re-deliver the first one afterwards.

    Only the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {sig: signal.signal(sig, lambda signum, _frame: got.append(signum)) for sig in DEFERRED}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if got:
            signal.raise_signal(got[0])


def delete_devices(names: list[str]) -> None:
    """Delete root-namespace devices (veth peers and bridge ports go with them)."""
    with IPRoute() as ipr:
        for name in names:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", ifname=name)


def kill_namespace_processes(hosts: list, exclude: set[int]) -> None:
    """Kill every process in the hosts' namespaces but their shells (and ``exclude``)."""
    shells = {h.pid for h in hosts if h.pid}
    inodes = {i for i in (netns_inode(p) for p in shells) if i is not None}
    kill_and_wait(pids_in_netns(inodes, exclude=shells | exclude))


def terminate_nodes(mn, hosts: list) -> None:
    """End the Mininet nodes (host shells, bridges) and make sure the shells are gone."""
    shells = {h.pid for h in hosts if h.pid}
    for node in mn.switches + hosts:
        node.waitExited = False
        with contextlib.suppress(Exception):
            node.terminate()
    kill_and_wait([p for p in shells if os.path.exists(f"/proc/{p}")], grace_s=1.0)
