"""The ``process`` runtime: a Mininet host (a shell in its own network namespace) whose
processes run under cgroup v1 limits.

``cpu`` is a share of ONE core (0.5 = half a core) and becomes a CFS quota;
``memory_mb`` becomes ``memory.limit_in_bytes``.  The cgroups live at
``/sys/fs/cgroup/<controller>/testbed/<run id>/<node>`` so concurrent runs never collide.
The host shell and every process started with ``popen`` join them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mininet.node import Host

CGROUP_ROOT = Path("/sys/fs/cgroup")
CFS_PERIOD_US = 100_000
SHARES_WEIGHT = 8 * 1024
_JOIN = 'for d in $TB_CGROUPS; do echo $$ > "$d/cgroup.procs"; done; exec "$@"'


def cgroup_dirs(run_id: str, node: str, cpu: float | None, memory_mb: int | None) -> list[Path]:
    """The cgroup directories a node with these limits needs (none when unlimited)."""
    dirs = []
    if cpu is not None:
        dirs.append(CGROUP_ROOT / "cpu" / "testbed" / run_id / node)
    if memory_mb is not None:
        dirs.append(CGROUP_ROOT / "memory" / "testbed" / run_id / node)
    return dirs


class ProcessHost(Host):
    """A Mininet ``Host`` with optional CPU (share of one core) and memory limits."""

    def __init__(self, name: str, run_id: str = "", cpu: float | None = None,
                 memory_mb: int | None = None, **params) -> None:
        self.run_id = run_id
        self.cpu_share = cpu
        self.memory_mb = memory_mb
        self.cgroups = cgroup_dirs(run_id, name, cpu, memory_mb)
        Host.__init__(self, name, **params)
        self._make_cgroups()

    def _make_cgroups(self) -> None:
        for d in self.cgroups:
            d.mkdir(parents=True, exist_ok=True)
            if d.parts[-4] == "cpu":
                # A capped node should get its share even on a loaded machine: the testbed's
                # groups weigh like SHARES_WEIGHT root tasks (the quota still caps each node).
                for g in (d.parent.parent, d.parent, d):
                    (g / "cpu.shares").write_text(str(SHARES_WEIGHT))
                (d / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                (d / "cpu.cfs_quota_us").write_text(str(max(1000, int(CFS_PERIOD_US * self.cpu_share))))
            else:
                (d / "memory.limit_in_bytes").write_text(str(self.memory_mb * 1024 * 1024))
            (d / "cgroup.procs").write_text(str(self.pid))  # the shell, hence `cmd` children

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
    for ctrl in ("cpu", "memory"):
        run_dir = CGROUP_ROOT / ctrl / "testbed" / run_id
        if not run_dir.is_dir():
            continue
        for d in [*sorted(p for p in run_dir.iterdir() if p.is_dir()), run_dir]:
            with contextlib.suppress(OSError):
                d.rmdir()
                removed.append(str(d))
    return removed
