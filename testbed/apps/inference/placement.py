"""Split inference's ``--placement``: the common grammar (``apps/placement.py``) with standbys
(``mec|cloud=8:30``) and an empty device stage (``phone=0:0``: token ids go upstream)."""

from __future__ import annotations

from testbed.apps.placement import Rules, Stage, parse_stages
from testbed.spec.topology import Topology

__all__ = ["RULES", "Stage", "parse_placement"]

RULES = Rules(standbys=True, empty_device=True, role="a shard")


def parse_placement(text: str, topo: Topology | None = None, n_layers: int | None = None) -> list[Stage]:
    """Stages of a split-inference run; a one-line ``SpecError`` (``--placement: ...``) if wrong."""
    return parse_stages(text, RULES, topo, n_layers)
