"""CPU and memory limits per node: explicit values from the topology, else role defaults.

``cpu`` is a share of one core (0.5 = half a core, 2.0 = two cores) enforced with the CFS
quota (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, or ``cpu.max`` on cgroup v2);
``memory_mb`` is a hard memory limit with no extra swap.  ``None`` means unlimited.

Role defaults (chosen so that a two-core development machine is never starved, while a
device is still visibly weaker than an edge server):

=======  ========  ==========  ==================================================
role     cpu       memory_mb   why
=======  ========  ==========  ==================================================
device   1.0       2048        one phone-class core; torch + SmolLM2-135M fit in 2 GiB
edge     2.0       4096        a small MEC server; two cores = a whole 2-core VM
cloud    None      None        a data-centre host: unlimited
cell     None      None        a shared L2 segment (a bridge): runs nothing
=======  ========  ==========  ==================================================

Both runtimes use :func:`resolve_limits`: the docker runtime passes the result to
``docker run --cpus/--memory``; the process runtime writes the same figures to a cgroup.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from testbed.spec.errors import SpecError
from testbed.spec.topology import MIN_MEMORY_MB, NodeSpec

CFS_PERIOD_US = 100_000  # the one CFS period of both runtimes (process hosts, docker --cpus)


@dataclass(frozen=True)
class Limits:
    """Resolved limits of one node; ``None`` = unlimited."""

    cpu: float | None = None
    memory_mb: int | None = None

    def cfs_quota_us(self, period_us: int = CFS_PERIOD_US) -> int:
        """The CFS quota for ``period_us``, rounded to the nearest us (-1 = unlimited, as v1 writes it)."""
        return -1 if self.cpu is None else max(1000, round(self.cpu * period_us))

    def memory_bytes(self) -> int | None:
        return None if self.memory_mb is None else self.memory_mb * 1024 * 1024

    def nano_cpus(self) -> int | None:
        """Docker's ``NanoCpus`` (cores x 1e9)."""
        return None if self.cpu is None else round(self.cpu * 1e9)


ROLE_DEFAULTS: dict[str, Limits] = {
    "device": Limits(cpu=1.0, memory_mb=2048),
    "edge": Limits(cpu=2.0, memory_mb=4096),
    "cloud": Limits(),
    "cell": Limits(),
}


def resolve_limits(node: NodeSpec, source: str | Path = "<topology>") -> Limits:
    """The node's own ``cpu``/``memory_mb`` where set, the role default otherwise.

    Raises :class:`SpecError` (``FILE: nodes.NAME.cpu: ...``) for non-positive values.
    """
    default = ROLE_DEFAULTS.get(node.role, Limits())
    cpu = node.cpu if node.cpu is not None else default.cpu
    mem = node.memory_mb if node.memory_mb is not None else default.memory_mb
    if cpu is not None and not cpu > 0:
        raise SpecError(source, f"nodes.{node.name}.cpu", f"must be > 0 (share of one core), got {cpu}")
    if mem is not None and (int(mem) != mem or mem < MIN_MEMORY_MB):
        raise SpecError(
            source, f"nodes.{node.name}.memory_mb", f"must be an integer >= {MIN_MEMORY_MB}, got {mem}"
        )
    return Limits(cpu=None if cpu is None else float(cpu), memory_mb=None if mem is None else int(mem))
