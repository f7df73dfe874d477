"""Where the CPU and memory controllers live on this machine: cgroup v1 or v2, found at run time.

A hybrid machine (v1 hierarchies plus an empty cgroup2 mount, like the development hosts) uses
v1, where the controllers are; a machine with only the unified hierarchy (Debian 12 with
systemd, the VM) uses v2.  Both keep the testbed's groups under ``testbed/<run id>/<node>``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("cpu", "memory")


def mounts(mountinfo: str | None = None) -> tuple[dict[frozenset[str], Path], Path | None]:
    """(v1 hierarchies keyed by their controller set, the cgroup2 mount or None).

    ``mountinfo``: the text of ``/proc/self/mountinfo`` (read when not given)."""
    v1: dict[frozenset[str], Path] = {}
    v2: Path | None = None
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(rfields) < 3 or fields[3] != "/":
            continue  # a bind mount of a sub-group (inside a container) is not a hierarchy root
        if rfields[0] == "cgroup2":
            v2 = v2 or Path(fields[4])
        elif rfields[0] == "cgroup":
            v1[frozenset(rfields[2].split(","))] = Path(fields[4])
    return v1, v2


@dataclass(frozen=True)
class Layout:
    """The cgroup version in use and the hierarchy root of each controller (the same dir on v2)."""

    version: int
    roots: dict[str, Path]


class CgroupUnavailable(RuntimeError):
    """Neither v1 hierarchies nor a v2 mount offer the cpu and memory controllers."""


def layout(mountinfo: str | None = None) -> Layout:
    """The cgroup layout of this machine; raises :class:`CgroupUnavailable` when there is none."""
    v1, v2 = mounts(mountinfo)
    roots = {c: next((p for opts, p in v1.items() if c in opts), None) for c in CONTROLLERS}
    if all(roots.values()):
        return Layout(1, {c: p for c, p in roots.items() if p is not None})
    if v2 is not None:
        with contextlib.suppress(OSError):
            available = (v2 / "cgroup.controllers").read_text().split()
            if all(c in available for c in CONTROLLERS):
                return Layout(2, dict.fromkeys(CONTROLLERS, v2))
    raise CgroupUnavailable("no cgroup hierarchy with the cpu and memory controllers "
                            f"(v1: {sorted(map(sorted, v1))}, v2: {v2})")


def shares_to_weight(shares: int) -> int:
    """v1 ``cpu.shares`` to the v2 ``cpu.weight`` of the same scheduler weight (1024 shares = one
    nice-0 task = weight 100, the kernel's own scale), clamped to 1..10000."""
    return max(1, min(10000, round(shares * 100 / 1024)))


def enable_controllers(root: Path, leaf: Path, controllers: list[str]) -> None:
    """v2: make ``controllers`` available in ``leaf`` by enabling them in every ancestor from ``root``.

    Only groups without processes of their own may delegate (the root is exempt); the testbed's
    ``testbed`` and run groups never hold processes, so this cannot fail for them.
    """
    want = " ".join(f"+{c}" for c in controllers)
    ancestors = [root, *(root / p for p in reversed(leaf.relative_to(root).parents[:-1]))]
    for d in ancestors:
        d.mkdir(exist_ok=True)
        have = (d / "cgroup.subtree_control").read_text().split()
        if not all(c in have for c in controllers):
            (d / "cgroup.subtree_control").write_text(want)
    leaf.mkdir(exist_ok=True)
