"""Split training's ``--placement phone=0:4,edge1=4:20,edge2=20:30``: the device's layers (from 0,
embeddings included), then one stage server per hop; the last one ends at the model's last layer.
The common grammar (``apps/placement.py``) without standbys or an empty device stage."""

from __future__ import annotations

from testbed.apps.placement import Rules, Stage, parse_stages
from testbed.spec.topology import Topology

__all__ = ["RULES", "Stage", "parse_placement"]

RULES = Rules(min_stages=2, too_few="split training needs the device and at least one stage server")


def parse_placement(text: str, topo: Topology | None = None, n_layers: int | None = None) -> list[Stage]:
    """Stages of a split-training run; a one-line ``SpecError`` (``--placement: ...``) if wrong."""
    return parse_stages(text, RULES, topo, n_layers)
