"""Typed topology model: nodes, asymmetric links and per-direction shaping.

Parsing and validation of YAML files live in this module too (``load_topology``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("device", "edge", "cloud", "cell")
RUNTIMES = ("process", "docker")


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

    def hosts(self) -> list[NodeSpec]:
        """Nodes that run processes (everything but cells)."""
        return [n for n in self.nodes.values() if n.role != "cell"]
