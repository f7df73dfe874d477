"""Typed topology model: nodes, asymmetric links and per-direction shaping.

``load_topology``/``parse_topology`` are the entry points for YAML files; the checks
themselves live in ``testbed.spec.parse``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed.spec.options import ROLES, RUNTIMES, TCP_CCS

MIN_MEMORY_MB = 16  # a node's smallest memory limit: below this not even a shell starts

__all__ = ["MIN_MEMORY_MB", "ROLES", "RUNTIMES", "TCP_CCS", "LinkSpec", "NodeSpec", "Shaping", "Topology",
           "load_topology", "parse_topology"]


@dataclass(frozen=True)
class Shaping:
    """One direction of a link.  ``bw_mbit=None`` means unlimited rate.

    With ``trace`` set, the rate (and for CSV traces delay/loss) is replayed from
    the trace file; ``delay_ms``/``loss_pct`` still add a fixed component.
    """

    bw_mbit: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    queue_pkts: int | None = None
    trace: Path | None = None
    format: str | None = None  # "mahimahi" | "csv"
    trace_start_s: float = 0.0  # replay starts at this point of the trace's clock


    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trace"] = str(self.trace) if self.trace else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Shaping:
        d = dict(d)
        if d.get("trace"):
            d["trace"] = Path(d["trace"])
        return cls(**d)


@dataclass(frozen=True)
class NodeSpec:
    """A device, edge or cloud host, or a ``cell`` (a shared L2 segment, i.e. a bridge)."""

    name: str
    role: str
    cpu: float | None = None  # share of one core, enforced by cgroups
    memory_mb: int | None = None
    runtime: str = "process"
    kv_budget_mb: int | None = None  # a shard node's sessions' KV caches stay within it (LRU eviction)
    kv_int8: bool = False  # a shard node keeps its KV caches in int8 (per-head scales)


@dataclass(frozen=True)
class LinkSpec:
    """A link; ``up`` shapes a -> b, ``down`` shapes b -> a."""

    a: str
    b: str
    up: Shaping = field(default_factory=Shaping)
    down: Shaping = field(default_factory=Shaping)


@dataclass
class Topology:
    name: str
    source: Path
    nodes: dict[str, NodeSpec]
    links: list[LinkSpec]
    tcp_cc: str = "cubic"
    events: list[Any] = field(default_factory=list)  # testbed.spec.events.Event, sorted by time
    security: str = "none"  # "curve": CurveZMQ between nodes, with per-run keys

    def hosts(self) -> list[NodeSpec]:
        """Nodes that run processes (everything but cells)."""
        return [n for n in self.nodes.values() if n.role != "cell"]

    def cells(self) -> list[NodeSpec]:
        """Shared L2 segments (bridges)."""
        return [n for n in self.nodes.values() if n.role == "cell"]

    def links_of(self, name: str) -> list[LinkSpec]:
        """Links with ``name`` at either end, in file order."""
        return [lk for lk in self.links if name in (lk.a, lk.b)]

    def neighbors(self, name: str) -> list[str]:
        """Names of the nodes directly linked to ``name``."""
        return [lk.b if lk.a == name else lk.a for lk in self.links_of(name)]

    def traces(self) -> list[Path]:
        """Trace files replayed by any link direction (absolute paths, no duplicates)."""
        seen: dict[Path, None] = {}
        for lk in self.links:
            for sh in (lk.up, lk.down):
                if sh.trace is not None:
                    seen[sh.trace] = None
        return list(seen)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (the YAML structure, with absolute trace paths)."""
        return {
            "name": self.name,
            "source": str(self.source),
            "tcp_cc": self.tcp_cc,
            "security": self.security,
            "nodes": {n.name: asdict(n) for n in self.nodes.values()},
            "links": [{"between": [lk.a, lk.b], "up": lk.up.to_dict(), "down": lk.down.to_dict()}
                      for lk in self.links],
            "events": [e.to_dict() for e in self.events],
        }


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology YAML file (errors: SpecError naming file and field)."""
    from testbed.spec.parse import load_topology as _load

    return _load(path)


def parse_topology(data: Any, source: Path) -> Topology:
    """Validate already-loaded YAML data; trace paths are relative to ``source``'s directory."""
    from testbed.spec.parse import parse_topology as _parse

    return _parse(data, source)
