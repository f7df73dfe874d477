"""``--placement phone=0:8,mec=8:30``: which host runs which contiguous layers, in pipeline order."""

from __future__ import annotations

from dataclasses import dataclass

from testbed.spec.errors import SpecError
from testbed.spec.topology import Topology

FIELD = "--placement"


@dataclass(frozen=True)
class Stage:
    node: str
    start: int
    end: int

    @property
    def layers(self) -> str:
        return f"{self.start}:{self.end}"


def parse_placement(text: str, topo: Topology | None = None, n_layers: int | None = None) -> list[Stage]:
    """Parse and check a placement; a one-line ``SpecError`` (``--placement: ...``) if it is wrong.

    Stages must be distinct hosts of ``topo`` whose ranges are non-empty, contiguous,
    start at layer 0 and end at ``n_layers``; only the first may be empty (``phone=0:0``):
    that device runs no layer and uploads token ids (edge/cloud offload).
    """
    stages: list[Stage] = []
    items = [p.strip() for p in (text or "").split(",")]
    if not text or not all(items):
        raise SpecError(FIELD, "", f"{text!r}: expected node=START:END[,node=START:END...]")
    for item in items:
        node, eq, rng = item.partition("=")
        start, colon, end = rng.partition(":")
        node = node.strip()
        try:
            s, e = int(start), int(end)
        except ValueError:
            s = e = -1
        if not eq or not colon or not node or s < 0 or e < 0:
            raise SpecError(FIELD, item, "expected node=START:END with integer layers")
        if e <= s and not (not stages and s == e == 0 and len(items) > 1):
            raise SpecError(FIELD, item, "empty layer range")
        stages.append(Stage(node, s, e))
    seen: set[str] = set()
    for st in stages:
        if st.node in seen:
            raise SpecError(FIELD, st.node, "node placed twice")
        seen.add(st.node)
        if topo is not None:
            spec = topo.nodes.get(st.node)
            if spec is None:
                raise SpecError(FIELD, st.node, f"no such node in {topo.name} ({', '.join(topo.nodes)})")
            if spec.role == "cell":
                raise SpecError(FIELD, st.node, "a cell cannot run a shard")
    if stages[0].start != 0:
        raise SpecError(FIELD, stages[0].node,
                        f"the first stage must start at layer 0, not {stages[0].start}")
    for prev, cur in zip(stages, stages[1:], strict=False):
        if cur.start != prev.end:
            raise SpecError(FIELD, cur.node,
                            f"starts at layer {cur.start} but {prev.node} ends at {prev.end}")
    if topo is not None and len(stages) > 1:
        from testbed.net.addressing import plan

        addresses = plan(topo)
        for prev, cur in zip(stages, stages[1:], strict=False):
            try:
                addresses.ip(cur.node, prev.node)
            except KeyError:
                raise SpecError(FIELD, cur.node, f"not reachable from {prev.node} in {topo.name}") from None
    if n_layers is not None and stages[-1].end != n_layers:
        raise SpecError(FIELD, stages[-1].node,
                        f"the last stage must end at layer {n_layers} (the model's layer count), "
                        f"not {stages[-1].end}")
    return stages
