"""``--placement phone=0:8,mec=8:30``: which host runs which contiguous layers, in pipeline order.

A stage after the first may name standbys: ``mec|cloud=8:30`` runs layers 8:30 on mec and keeps
the same shard loaded on cloud, which takes over if mec stops answering.
"""

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
    standbys: tuple[str, ...] = ()  # nodes that take over, in this order, if ``node`` fails

    @property
    def layers(self) -> str:
        return f"{self.start}:{self.end}"

    @property
    def nodes(self) -> list[str]:
        return [self.node, *self.standbys]

    def __str__(self) -> str:
        return f"{'|'.join(self.nodes)}={self.layers}"


def parse_placement(text: str, topo: Topology | None = None, n_layers: int | None = None) -> list[Stage]:
    """Parse and check a placement; a one-line ``SpecError`` (``--placement: ...``) if it is wrong.

    Stages must be distinct hosts of ``topo`` whose ranges are non-empty, contiguous,
    start at layer 0 and end at ``n_layers``; only the first may be empty (``phone=0:0``):
    that device runs no layer and uploads token ids (edge/cloud offload).  A stage after the
    first may list standbys after its node (``mec|cloud=8:30``): distinct hosts, placed nowhere
    else, reachable from the stage before and reaching the stage after.
    """
    stages: list[Stage] = []
    items = [p.strip() for p in (text or "").split(",")]
    if not text or not all(items):
        raise SpecError(FIELD, "", f"{text!r}: expected node=START:END[,node=START:END...] "
                                   "(node|standby=START:END for a stage with standbys)")
    for item in items:
        node, eq, rng = item.partition("=")
        start, colon, end = rng.partition(":")
        names = [n.strip() for n in node.split("|")]
        try:
            s, e = int(start), int(end)
        except ValueError:
            s = e = -1
        if not eq or not colon or not names[0] or s < 0 or e < 0:
            raise SpecError(FIELD, item, "expected node=START:END with integer layers")
        if not all(names):
            raise SpecError(FIELD, item, "expected node|standby=START:END: a standby name is empty")
        if e <= s and not (not stages and s == e == 0 and len(items) > 1):
            raise SpecError(FIELD, item, "empty layer range")
        if not stages and len(names) > 1:
            raise SpecError(FIELD, item, "the first stage runs the client on its device: it cannot have "
                                         "a standby")
        stages.append(Stage(names[0], s, e, tuple(names[1:])))
    seen: set[str] = set()
    for st in stages:
        for name in st.nodes:
            if name in seen:
                raise SpecError(FIELD, name, "node placed twice")
            seen.add(name)
            if topo is not None:
                spec = topo.nodes.get(name)
                if spec is None:
                    raise SpecError(FIELD, name, f"no such node in {topo.name} ({', '.join(topo.nodes)})")
                if spec.role == "cell":
                    raise SpecError(FIELD, name, "a cell cannot run a shard")
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
            for a in prev.nodes:  # every upstream candidate reaches every candidate of this stage
                for b in cur.nodes:
                    try:
                        addresses.ip(b, a)
                    except KeyError:
                        raise SpecError(FIELD, b, f"not reachable from {a} in {topo.name}") from None
    if n_layers is not None and stages[-1].end != n_layers:
        raise SpecError(FIELD, stages[-1].node,
                        f"the last stage must end at layer {n_layers} (the model's layer count), "
                        f"not {stages[-1].end}")
    return stages
