"""Remove leftovers of testbed runs: processes, devices, namespaces, cgroups, containers, state files.

A process belongs to a run when its environment has ``TESTBED_RUN``; devices in the root
namespace carry the ``tb`` prefix (and are listed in state files).  ``clean(all_runs=False)``
(``testbed clean``) only touches runs whose owner process is dead; ``clean(all_runs=True)``
(``testbed clean --all``) removes everything except the caller and its ancestors.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.hosts.process_host import cgroup_run_ids, remove_run_cgroups, run_cgroup_dirs
from testbed.net import hostwide
from testbed.net.naming import ENV_MARKER, PREFIX, STATE_DIR, alive, hand_over, load_states
from testbed.net.teardown import kill_and_wait

NETNS_DIR = Path("/run/netns")
CONTAINER_LABEL = "edgellm-testbed"
_DEVICE_RE = re.compile(rf"^{PREFIX}([0-9a-f]{{5}})")


def _ancestors() -> set[int]:
    """Our own pid and every ancestor's (never to be killed)."""
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            break
    return out


def marked_processes() -> dict[int, str]:
    """pid -> run id for every process carrying ``TESTBED_RUN``."""
    out = {}
    marker = ENV_MARKER.encode() + b"="
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        for item in env.split(b"\0"):
            if item.startswith(marker):
                out[int(entry)] = item[len(marker):].decode(errors="replace")
                break
    return out


def leftovers(run_id: str) -> dict[str, list]:
    """What of run ``run_id`` still exists: root devices, processes, cgroups, state file."""
    with IPRoute() as ipr:
        names = [x.get("ifname", "") for x in ipr.get_links()]
    devices = [n for n in names if n.startswith(PREFIX + run_id)]
    procs = [pid for pid, rid in marked_processes().items() if rid == run_id]
    cgroups = [str(d) for d in run_cgroup_dirs(run_id)]  # cgroup v1 or v2
    state = [str(f) for f in STATE_DIR.glob(f"{run_id}.json")]
    return {"devices": devices, "processes": procs, "cgroups": cgroups, "state": state}


def clean(all_runs: bool = False) -> dict[str, list]:
    """Remove leftovers; returns what was removed, by kind.

    Only runs whose owner is dead, unless ``all_runs``.  Host-wide settings a removed run
    changed are put back (``hostwide.restore``), minding the runs that stay."""
    states = {s["run_id"]: s for s in load_states()}
    live_owners = {rid for rid, s in states.items()
                   if alive(s.get("owner_pid")) and s.get("owner_pid") != os.getpid()}
    me = _ancestors()

    def doomed(run_id: str) -> bool:
        return all_runs or run_id not in live_owners

    removed: dict[str, list] = {"processes": [], "devices": [], "namespaces": [], "cgroups": [],
                                "containers": [], "state_files": [], "settings": []}
    procs = {pid: rid for pid, rid in marked_processes().items() if pid not in me and doomed(rid)}
    for s in states.values():
        if doomed(s["run_id"]):
            for pid in [*s.get("link_pids", []), *s.get("host_pids", {}).values()]:
                if alive(pid) and pid not in me and _marked_by(pid, s["run_id"]):
                    procs[pid] = s["run_id"]
    kill_and_wait(sorted(procs))
    removed["processes"] = sorted(procs)

    listed = {name: s["run_id"] for s in states.values() for name in
              [*s.get("interfaces", []), *s.get("bridges", [])]}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get("ifname") or ""
            m = _DEVICE_RE.match(name)
            rid = listed.get(name) or (m.group(1) if m else None)
            if rid is None or not doomed(rid):
                continue
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=link["index"])
                removed["devices"].append(name)

    if NETNS_DIR.is_dir():
        for ns in NETNS_DIR.iterdir():
            m = _DEVICE_RE.match(ns.name)
            if ns.name.startswith("tbt-"):
                continue  # test harness namespaces (userspace.netns_link) clean up themselves
            if ns.name.startswith(PREFIX) and (m is None or doomed(m.group(1))):
                from pyroute2 import netns

                with contextlib.suppress(OSError):
                    netns.remove(ns.name)
                    removed["namespaces"].append(ns.name)

    run_ids = set(states) | set(procs.values()) | _cgroup_runs()
    for rid in sorted(run_ids):
        if doomed(rid):
            removed["cgroups"] += remove_run_cgroups(rid)

    removed["containers"] = _remove_containers(doomed)

    staying = [s for rid, s in states.items() if not doomed(rid)]
    needs = [s.get("host_settings", {}).get("needs", {}) for s in staying]
    for rid, s in states.items():
        if doomed(rid):
            changed = s.get("host_settings", {}).get("changed", {})

            def give(key: str, value: str) -> None:
                hand_over(STATE_DIR / f"{staying[0]['run_id']}.json", key, value)

            removed["settings"] += hostwide.restore(changed, needs, give if staying else None)
            (STATE_DIR / f"{rid}.json").unlink(missing_ok=True)
            removed["state_files"].append(rid)
    return removed


def _marked_by(pid: int, run_id: str) -> bool:
    """Is ``pid`` really a process of ``run_id`` (not a recycled pid)?"""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{ENV_MARKER}={run_id}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def _cgroup_runs() -> set[str]:
    return cgroup_run_ids()


def _remove_containers(doomed) -> list[str]:
    """Containers labelled ``edgellm-testbed`` (label value: run id); skipped without an engine."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
    except Exception:
        return []
    out = []
    from testbed.hosts.docker_engine import RUN_LABEL, remove_container

    for c in client.containers.list(all=True, filters={"label": CONTAINER_LABEL}):
        # docker runtime: edgellm-testbed=1, the run id is in edgellm-testbed.run;
        # remove_container also kills processes attached to the container from outside.
        if doomed(c.labels.get(RUN_LABEL) or c.labels.get(CONTAINER_LABEL, "")):
            with contextlib.suppress(Exception):
                remove_container(c)
                out.append(c.name)
    return out
