"""The ``process`` runtime: a Mininet host (a shell in its own network namespace) whose
processes run under cgroup limits, v1 or v2 (whichever holds the controllers, see ``cgroups``).

``cpu`` is a share of ONE core (0.5 = half a core) and becomes a CFS quota (v1
``cpu.cfs_quota_us``, v2 ``cpu.max``); ``memory_mb`` becomes a hard limit with no extra swap
(v1 ``memory.limit_in_bytes`` = ``memory.memsw.limit_in_bytes``, v2 ``memory.max`` and
``memory.swap.max`` = 0).  The groups live
at ``<hierarchy>/testbed/<run id>/<node>`` so concurrent runs never collide.  The host shell and
every process started with ``popen`` join them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mininet.node import Host

from testbed.hosts import cgroups
from testbed.hosts.limits import CFS_PERIOD_US, Limits

SHARES_WEIGHT = 8 * 1024
_JOIN = 'for d in $TB_CGROUPS; do echo $$ > "$d/cgroup.procs"; done; exec "$@"'


def cgroup_dirs(run_id: str, node: str, cpu: float | None, memory_mb: int | None,
                layout: cgroups.Layout | None = None) -> list[Path]:
    """The cgroup directories a node with these limits needs (none when unlimited; one on v2)."""
    wanted = [c for c, v in (("cpu", cpu), ("memory", memory_mb)) if v is not None]
    if not wanted:
        return []
    lay = layout or cgroups.layout()
    return list(dict.fromkeys(lay.roots[c] / "testbed" / run_id / node for c in wanted))


def _hierarchies() -> list[Path]:
    """Every cgroup hierarchy root (v1 and v2): the docker runtime leaves groups in all of them."""
    v1, v2 = cgroups.mounts()
    return list(dict.fromkeys([*v1.values(), *([v2] if v2 else [])]))


def run_cgroup_dirs(run_id: str) -> list[Path]:
    """The run's group directories that exist now, in any hierarchy (for leftover checks)."""
    bases = _hierarchies()
    return [b / "testbed" / run_id for b in bases if (b / "testbed" / run_id).is_dir()]


def cgroup_run_ids() -> set[str]:
    """Run ids that have a testbed group on this machine."""
    tops = [b / "testbed" for b in _hierarchies() if (b / "testbed").is_dir()]
    return {p.name for top in tops for p in top.iterdir() if p.is_dir()}


class ProcessHost(Host):
    """A Mininet ``Host`` with optional CPU (share of one core) and memory limits."""

    def __init__(self, name: str, run_id: str = "", cpu: float | None = None,
                 memory_mb: int | None = None, **params) -> None:
        self.run_id = run_id
        self.cpu_share = cpu
        self.memory_mb = memory_mb
        self.limits = Limits(cpu=cpu, memory_mb=memory_mb)
        self.cgroup_layout = cgroups.layout() if cpu is not None or memory_mb is not None else None
        self.cgroups = cgroup_dirs(run_id, name, cpu, memory_mb, self.cgroup_layout)
        Host.__init__(self, name, **params)
        self._make_cgroups()

    def _make_cgroups(self) -> None:
        lay = self.cgroup_layout
        if lay is None:
            return
        if lay.version == 1:
            self._make_v1(lay)
        else:
            self._make_v2(lay)
        for d in self.cgroups:
            (d / "cgroup.procs").write_text(str(self.pid))  # the shell, hence `cmd` children

    def _make_v1(self, lay: cgroups.Layout) -> None:
        lim = self.limits
        if lim.cpu is not None:
            d = lay.roots["cpu"] / "testbed" / self.run_id / self.name
            d.mkdir(parents=True, exist_ok=True)
            # A capped node should get its share even on a loaded machine: the testbed's
            # groups weigh like SHARES_WEIGHT root tasks (the quota still caps each node).
            for g in (d.parent.parent, d.parent, d):
                (g / "cpu.shares").write_text(str(SHARES_WEIGHT))
            (d / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (d / "cpu.cfs_quota_us").write_text(str(lim.cfs_quota_us()))
        if lim.memory_mb is not None:
            d = lay.roots["memory"] / "testbed" / self.run_id / self.name
            d.mkdir(parents=True, exist_ok=True)
            (d / "memory.limit_in_bytes").write_text(str(lim.memory_bytes()))
            memsw = d / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # memory + swap = memory: no extra swap (needs the limit above first)
                memsw.write_text(str(lim.memory_bytes()))

    def _make_v2(self, lay: cgroups.Layout) -> None:
        lim = self.limits
        root = lay.roots["cpu"]
        d = root / "testbed" / self.run_id / self.name
        wanted = [c for c, v in (("cpu", lim.cpu), ("memory", lim.memory_mb)) if v is not None]
        cgroups.enable_controllers(root, d, wanted)
        if lim.cpu is not None:
            weight = str(cgroups.shares_to_weight(SHARES_WEIGHT))
            for g in (d.parent.parent, d.parent, d):  # same weighting as v1 (see _make_v1)
                (g / "cpu.weight").write_text(weight)
            (d / "cpu.max").write_text(f"{lim.cfs_quota_us()} {CFS_PERIOD_US}")
        if lim.memory_mb is not None:
            (d / "memory.max").write_text(str(lim.memory_bytes()))
            swap = d / "memory.swap.max"
            if swap.exists():  # absent when the kernel does not account swap
                swap.write_text("0")

    def popen(self, *args, **kwargs):
        """Like ``Host.popen``; the process joins this host's cgroups before it enters the host.

        The joining happens in the root mount namespace: inside the host, Mininet's fresh
        sysfs hides /sys/fs/cgroup."""
        if not self.cgroups:
            return Host.popen(self, *args, **kwargs)
        env = dict(kwargs.pop("env", None) or os.environ)
        env["TB_CGROUPS"] = " ".join(str(d) for d in self.cgroups)
        mncmd = ["sh", "-c", _JOIN, "sh", "mnexec", "-da", str(self.pid)]
        return Host.popen(self, *args, mncmd=mncmd, env=env, **kwargs)

    def remove_cgroups(self) -> None:
        """Delete the cgroups (after every process in them has exited)."""
        for d in self.cgroups:
            with contextlib.suppress(OSError):
                d.rmdir()


def remove_run_cgroups(run_id: str) -> list[str]:
    """Remove the (empty) cgroup directories of a run; returns those removed."""
    removed = []
    for run_dir in run_cgroup_dirs(run_id):
        for d in [*sorted(p for p in run_dir.iterdir() if p.is_dir()), run_dir]:
            with contextlib.suppress(OSError):
                d.rmdir()
                removed.append(str(d))
    return removed
