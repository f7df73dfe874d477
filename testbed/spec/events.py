"""Network dynamics and faults during a run: the ``events:`` list of a topology, a suite point or an
``--events FILE``.

Five kinds, each with ``at_s`` (seconds after the workload starts)::

    events:
      - {at_s: 5,  link: [phone, mec], up: {bw_mbit: 1}}          # change: fields given replace the link's
      - {at_s: 8,  link: [phone, mec], down_for_s: 3}             # outage: every packet lost, then back
      - {at_s: 12, handover: phone, from: cell1, to: cell2}       # re-attach a device to another cell
      - {at_s: 15, kill: mec}                                     # SIGKILL of the node's programs
      - {at_s: 20, restart: mec}

``up`` shapes the first node of ``link`` -> the second, ``down`` the other way, whichever way the
topology lists the link; events are stored in the topology's orientation.  A change merges its
fields over the link's settings at that moment (``jitter_ms <= delay_ms`` is checked on the
result).  A traced direction follows its trace: capacity changes and outages are refused on it.
Every problem is one ``SpecError`` ``SOURCE: events[i].field: problem (got VALUE)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from testbed.spec import check
from testbed.spec.check import Checker, Range
from testbed.spec.errors import got
from testbed.spec.topology import Shaping, Topology

AT_S = Range(ge=0, le=86_400, note="one day")
DOWN_FOR_S = Range(gt=0, le=3600, note="one hour")
KINDS = ("change", "outage", "handover", "kill", "restart")
CHANGE_KEYS = ("bw_mbit", "delay_ms", "jitter_ms", "loss_pct", "queue_pkts")
_KEYS = {
    "change": ("at_s", "link", "up", "down"),
    "outage": ("at_s", "link", "down_for_s"),
    "handover": ("at_s", "handover", "from", "to"),
    "kill": ("at_s", "kill"),
    "restart": ("at_s", "restart"),
}
FILE_KEYS = ("description", "events")


@dataclass(frozen=True)
class Event:
    """One scheduled event; ``link`` is in the topology's orientation (``up`` = first -> second)."""

    at_s: float
    kind: str  # one of KINDS
    link: tuple[str, str] | None = None
    up: dict[str, Any] | None = field(default=None, hash=False)  # change: the fields it sets
    down: dict[str, Any] | None = field(default=None, hash=False)
    down_for_s: float | None = None  # outage
    node: str | None = None  # handover (the device), kill, restart
    src: str | None = None  # handover: the cell it leaves
    dst: str | None = None  # handover: the cell it joins

    def to_dict(self) -> dict[str, Any]:
        """The event as a record shows it (the YAML form, in the topology's orientation)."""
        d: dict[str, Any] = {"at_s": self.at_s, "kind": self.kind}
        if self.link is not None:
            d["link"] = list(self.link)
        if self.kind == "change":
            d.update({k: v for k, v in (("up", self.up), ("down", self.down)) if v is not None})
        elif self.kind == "outage":
            d["down_for_s"] = self.down_for_s
        elif self.kind == "handover":
            d.update({"handover": self.node, "from": self.src, "to": self.dst})
        else:
            d[self.kind] = self.node
        return d


def merged(base: Shaping, fields: Mapping[str, Any] | None) -> Shaping:
    """``base`` with a change's fields set."""
    return replace(base, **dict(fields)) if fields else base


def load_events(path: str | Path, topo: Topology, source: str | Path | None = None,
                flag: str = "--events") -> list[Event]:
    """An events file (``events: [...]``, or the list alone); errors name the file.

    ``source``: the command or file that named it (a missing file reads ``SOURCE: --events: PATH:
    file not found``)."""
    from testbed.spec.yamlfile import load_yaml

    path = Path(path)
    data = load_yaml(path, source, flag if source is not None else "file")
    if isinstance(data, Mapping):
        data = Checker(path).mapping(data, "", FILE_KEYS).get("events")
    return parse_events(data, topo, path, "events")


def combined(first: list[Event], second: list[Event], topo: Topology, source: str | Path) -> list[Event]:
    """Two checked lists (a topology's and an ``--events`` file's) as one, sorted by time, with the
    rules over time (overlapping outages, handovers) checked on the whole; errors name ``source``
    and index the combined list."""
    both = sorted([*first, *second], key=lambda e: e.at_s)
    _EventParser(source, topo).check_sequence(list(enumerate(both)), "events (with the topology's, by time)")
    return both


def parse_events(data: Any, topo: Topology, source: str | Path, fld: str = "events") -> list[Event]:
    """Check an events list against ``topo``; the events sorted by time (stable)."""
    return _EventParser(source, topo).events(data, fld)


class _EventParser(Checker):
    def __init__(self, source: str | Path, topo: Topology) -> None:
        super().__init__(source)
        self.topo = topo

    def events(self, data: Any, fld: str) -> list[Event]:
        if data is None:
            return []
        if not isinstance(data, list):
            raise self.fail(fld, f"must be a list of events {got(data)}")
        pairs = sorted(((i, self.event(body, f"{fld}[{i}]")) for i, body in enumerate(data)),
                       key=lambda p: p[1].at_s)
        self.check_sequence(pairs, fld)
        return [e for _, e in pairs]

    def kind_of(self, body: Mapping[str, Any], fld: str) -> str:
        for kind in ("handover", "kill", "restart"):
            if kind in body:
                return kind
        if "link" in body:
            return "outage" if "down_for_s" in body else "change"
        raise self.fail(fld, "must name a link (a change or an outage), handover, kill or restart "
                             f"{got(dict(body))}")

    def event(self, body: Any, fld: str) -> Event:
        body = self.mapping(body, fld, what="a mapping like {at_s: 5, link: [a, b], up: {bw_mbit: 1}}")
        kind = self.kind_of(body, fld)
        self.mapping(body, fld, _KEYS[kind])
        if "at_s" not in body:
            raise self.fail(f"{fld}.at_s", "missing (seconds after the workload starts)")
        at = self.number(body["at_s"], f"{fld}.at_s", AT_S)
        if kind in ("change", "outage"):
            a, b, swapped = self.link(body["link"], f"{fld}.link")
            if kind == "outage":
                dur = self.number(body.get("down_for_s"), f"{fld}.down_for_s", DOWN_FOR_S)
                self.untraced(a, b, ("up", "down"), f"{fld}.link")
                return Event(at, kind, (a, b), down_for_s=dur)
            if body.get("up") is None and body.get("down") is None:
                raise self.fail(fld, "a change needs up, down or both (e.g. up: {bw_mbit: 1})")
            sides = {side: self.change(body[side], f"{fld}.{side}")
                     for side in ("up", "down") if body.get(side) is not None}
            if swapped:  # stored in the topology's orientation
                sides = {("down" if s == "up" else "up"): v for s, v in sides.items()}
            self.untraced(a, b, tuple(sides), f"{fld}.link")
            return Event(at, kind, (a, b), up=sides.get("up"), down=sides.get("down"))
        if kind == "handover":
            dev = self.host(body["handover"], f"{fld}.handover", role="device")
            src = self.cell(body.get("from"), f"{fld}.from")
            dst = self.cell(body.get("to"), f"{fld}.to")
            if src == dst:
                raise self.fail(f"{fld}.to", f"must be another cell than from {got(dst)}")
            return Event(at, kind, node=dev, src=src, dst=dst)
        return Event(at, kind, node=self.host(body[kind], f"{fld}.{kind}"))

    def link(self, value: Any, fld: str) -> tuple[str, str, bool]:
        """(a, b) as the topology lists the link, and whether ``value`` named it the other way."""
        if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, str) for v in value):
            raise self.fail(fld, f"must be a list of two node names {got(value)}")
        for lk in self.topo.links:
            if [lk.a, lk.b] == value:
                return lk.a, lk.b, False
            if [lk.b, lk.a] == value:
                return lk.a, lk.b, True
        raise self.fail(fld, f"no link between {value[0]} and {value[1]} in {self.topo.source.name} "
                             f"{got(value)}")

    def untraced(self, a: str, b: str, sides: tuple[str, ...], fld: str) -> None:
        lk = next(lk for lk in self.topo.links if (lk.a, lk.b) == (a, b))
        for side in sides:
            if getattr(lk, side).trace is not None:
                raise self.fail(fld, f"the {side} direction replays a trace, which sets its capacity "
                                     f"(got [{a}, {b}])")

    def change(self, value: Any, fld: str) -> dict[str, Any]:
        body = self.mapping(value, fld, CHANGE_KEYS)
        if not body:
            raise self.fail(fld, f"must set at least one of {', '.join(CHANGE_KEYS)} {got(dict(body))}")
        return {k: self.number(v, f"{fld}.{k}", check.BOUNDS[k]) for k, v in body.items()}

    def host(self, value: Any, fld: str, role: str | None = None) -> str:
        spec = self.topo.nodes.get(value) if isinstance(value, str) else None
        if spec is None or spec.role == "cell":
            hosts = ", ".join(n.name for n in self.topo.hosts())
            raise self.fail(fld, f"must be a host of {self.topo.source.name} ({hosts}) {got(value)}")
        if role is not None and spec.role != role:
            raise self.fail(fld, f"must be a {role} node ({value} is a {spec.role}) {got(value)}")
        return value

    def cell(self, value: Any, fld: str) -> str:
        spec = self.topo.nodes.get(value) if isinstance(value, str) else None
        if spec is None or spec.role != "cell":
            cells = ", ".join(c.name for c in self.topo.cells()) or "none"
            raise self.fail(fld, f"must be a cell of {self.topo.source.name} (cells: {cells}) {got(value)}")
        return value

    def check_sequence(self, pairs: list[tuple[int, Event]], fld: str) -> None:
        """Rules over time: merged settings stay valid, a handover leaves the cell the device is in,
        an outage does not start while the same link is out."""
        current = {(lk.a, lk.b): {"up": lk.up, "down": lk.down} for lk in self.topo.links}
        attached = {n.name: {nb for nb in self.topo.neighbors(n.name) if self.topo.nodes[nb].role == "cell"}
                    for n in self.topo.hosts()}
        out_until: dict[tuple[str, str], float] = {}
        for i, e in pairs:
            where = f"{fld}[{i}]"
            if e.kind == "change":
                for side in ("up", "down"):
                    s = merged(current[e.link][side], getattr(e, side))
                    if s.jitter_ms > s.delay_ms:
                        raise self.fail(f"{where}.{side}.jitter_ms",
                                        f"must be <= delay_ms ({s.delay_ms:g}) after the change "
                                        f"(got {s.jitter_ms:g})")
                    current[e.link][side] = s
            elif e.kind == "outage":
                if out_until.get(e.link, -1.0) > e.at_s:
                    raise self.fail(f"{where}.at_s", f"the link is still out until {out_until[e.link]:g} s "
                                                     f"(got {e.at_s:g})")
                out_until[e.link] = e.at_s + (e.down_for_s or 0.0)
            elif e.kind == "handover":
                if e.src not in attached[e.node]:
                    now = ", ".join(sorted(attached[e.node])) or "no cell"
                    raise self.fail(f"{where}.from", f"{e.node} is attached to {now} at {e.at_s:g} s "
                                                     f"{got(e.src)}")
                attached[e.node] = (attached[e.node] - {e.src}) | {e.dst}
