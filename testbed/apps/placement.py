"""``--placement phone=0:8,mec=8:30``: which host runs which contiguous layers, in pipeline order.

The one grammar of every application's placement.  A stage after the first may name standbys
(``mec|cloud=8:30``: the same shard loaded on cloud, which takes over if mec stops answering) where
the application allows them; the first stage may be empty (``phone=0:0``: the device runs no layer)
where the application allows that.
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


@dataclass(frozen=True)
class Rules:
    """What an application accepts beyond the common grammar."""

    standbys: bool = False  # ``node|standby=START:END`` after the first stage
    empty_device: bool = False  # ``phone=0:0`` as the first of several stages
    min_stages: int = 1
    too_few: str = ""  # the problem when there are fewer than ``min_stages``
    role: str = "a stage"  # what a host runs, in messages


def parse_stages(text: str, rules: Rules, topo: Topology | None = None,
                 n_layers: int | None = None) -> list[Stage]:
    """Parse and check a placement; a one-line ``SpecError`` (``--placement: ...``) if it is wrong.

    Stages are distinct hosts of ``topo`` whose ranges are non-empty, contiguous, start at layer 0
    and end at ``n_layers``; every candidate of a stage (its node and standbys) reaches every
    candidate of the next one."""
    items = [p.strip() for p in (text or "").split(",")]
    if not text or not all(items):
        extra = " (node|standby=START:END for a stage with standbys)" if rules.standbys else ""
        raise SpecError(FIELD, "", f"{text!r}: expected node=START:END[,node=START:END...]{extra}")
    stages = [_stage(item, i, len(items), rules) for i, item in enumerate(items)]
    if len(stages) < rules.min_stages:
        raise SpecError(FIELD, text, rules.too_few)
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
                    raise SpecError(FIELD, name, f"a cell cannot run {rules.role}")
    if stages[0].start != 0:
        raise SpecError(FIELD, stages[0].node,
                        f"the first stage must start at layer 0, not {stages[0].start}")
    for prev, cur in zip(stages, stages[1:], strict=False):
        if cur.start != prev.end:
            raise SpecError(FIELD, cur.node,
                            f"starts at layer {cur.start} but {prev.node} ends at {prev.end}")
    if n_layers is not None and stages[-1].end != n_layers:
        raise SpecError(FIELD, stages[-1].node,
                        f"the last stage must end at layer {n_layers} (the model's layer count), "
                        f"not {stages[-1].end}")
    if topo is not None and len(stages) > 1:
        _check_reachable(stages, topo)
    return stages


def _stage(item: str, index: int, count: int, rules: Rules) -> Stage:
    node, eq, rng = item.partition("=")
    start, colon, end = rng.partition(":")
    names = [n.strip() for n in node.split("|")]
    try:
        s, e = int(start), int(end)
    except ValueError:
        s = e = -1
    if not eq or not colon or not names[0] or s < 0 or e < 0:
        raise SpecError(FIELD, item, "expected node=START:END with integer layers")
    if len(names) > 1 and not rules.standbys:
        raise SpecError(FIELD, item, "expected node=START:END: this command takes no standbys")
    if not all(names):
        raise SpecError(FIELD, item, "expected node|standby=START:END: a standby name is empty")
    if e <= s and not (rules.empty_device and index == 0 and s == e == 0 and count > 1):
        raise SpecError(FIELD, item, "empty layer range")
    if index == 0 and len(names) > 1:
        raise SpecError(FIELD, item, "the first stage runs the client on its device: it cannot have "
                                     "a standby")
    return Stage(names[0], s, e, tuple(names[1:]))


def _check_reachable(stages: list[Stage], topo: Topology) -> None:
    from testbed.net.addressing import plan

    addresses = plan(topo)
    for prev, cur in zip(stages, stages[1:], strict=False):
        for a in prev.nodes:
            for b in cur.nodes:
                try:
                    addresses.ip(b, a)
                except KeyError:
                    raise SpecError(FIELD, b, f"not reachable from {a} in {topo.name}") from None
