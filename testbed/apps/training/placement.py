"""``--placement phone=0:4,edge1=4:20,edge2=20:30``: the device's layers, then each stage's, in order."""

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
    """The device first (layers from 0, embeddings included), then one stage server per hop; the last
    one ends at the model's last layer and holds the head and the loss.  A one-line SpecError if wrong."""
    items = [p.strip() for p in (text or "").split(",")]
    if not text or not all(items):
        raise SpecError(FIELD, "", f"{text!r}: expected node=START:END,node=START:END[,...]")
    stages: list[Stage] = []
    for item in items:
        node, eq, rng = item.partition("=")
        start, colon, end = rng.partition(":")
        try:
            s, e = int(start), int(end)
        except ValueError:
            s = e = -1
        if not eq or not colon or not node.strip() or s < 0 or e <= s:
            raise SpecError(FIELD, item, "expected node=START:END with integer layers, START < END")
        stages.append(Stage(node.strip(), s, e))
    if len(stages) < 2:
        raise SpecError(FIELD, text, "split training needs the device and at least one stage server")
    if len({st.node for st in stages}) != len(stages):
        raise SpecError(FIELD, text, "a node is placed twice")
    if stages[0].start != 0:
        raise SpecError(FIELD, stages[0].node, f"the device starts at layer 0, not {stages[0].start}")
    for prev, cur in zip(stages, stages[1:], strict=False):
        if cur.start != prev.end:
            raise SpecError(FIELD, cur.node,
                            f"starts at layer {cur.start} but {prev.node} ends at {prev.end}")
    if n_layers is not None and stages[-1].end != n_layers:
        raise SpecError(FIELD, stages[-1].node,
                        f"the last stage must end at layer {n_layers} (the model's layer count), "
                        f"not {stages[-1].end}")
    if topo is not None:
        from testbed.net.addressing import plan

        for st in stages:
            spec = topo.nodes.get(st.node)
            if spec is None:
                raise SpecError(FIELD, st.node, f"no such node in {topo.name} ({', '.join(topo.nodes)})")
            if spec.role == "cell":
                raise SpecError(FIELD, st.node, "a cell cannot run a stage")
        addresses = plan(topo)
        for prev, cur in zip(stages, stages[1:], strict=False):
            try:
                addresses.ip(cur.node, prev.node)
            except KeyError:
                raise SpecError(FIELD, cur.node, f"not reachable from {prev.node} in {topo.name}") from None
    return stages
