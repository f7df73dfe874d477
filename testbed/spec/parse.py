"""Checking topology YAML data and building the typed model (``testbed.spec.topology``).

Every problem raises one SpecError ``FILE: field.path: what is wrong (got VALUE)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from testbed.spec.errors import SpecError
from testbed.spec.topology import (
    MIN_MEMORY_MB,
    ROLES,
    RUNTIMES,
    TCP_CCS,
    LinkSpec,
    NodeSpec,
    Shaping,
    Topology,
)
from testbed.spec.traces import FORMATS, infer_format, load_trace
from testbed.spec.yamlfile import load_yaml

TOP_KEYS = ("name", "description", "tcp_cc", "nodes", "links")
NODE_KEYS = ("role", "cpu", "memory_mb", "runtime")
LINK_KEYS = ("between", "up", "down")
DIRECTION_KEYS = ("bw_mbit", "delay_ms", "jitter_ms", "loss_pct", "queue_pkts", "trace", "format")
NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,9}")
RESERVED_PREFIX = "tb"


def got(value: Any) -> str:
    """``(got VALUE)`` with strings quoted, so the bad value is visible."""
    return f"(got {value!r})" if isinstance(value, str) else f"(got {value})"


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology YAML file."""
    return parse_topology(load_yaml(path), Path(path))


def parse_topology(data: Any, source: Path) -> Topology:
    """Validate loaded YAML data against the topology schema."""
    return _Parser(Path(source)).topology(data)


class _Parser:
    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, field: str, message: str) -> SpecError:
        return SpecError(self.source, field, message)

    # -- generic checks ----------------------------------------------------------------

    def mapping(self, value: Any, field: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(field or "(top level)", f"must be a mapping {got(value)}")
        for key in value:
            if key not in allowed:
                where = f"{field}.{key}" if field else str(key)
                raise self.fail(where, f"unknown key {key!r} (expected one of {', '.join(allowed)})")
        return value

    def number(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(field, f"must be a finite number {got(value)}")
        return float(value)

    def integer(self, value: Any, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"must be an integer {got(value)}")
        return value

    def choice(self, value: Any, field: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(field, f"must be one of {', '.join(choices)} {got(value)}")
        return value

    # -- the document --------------------------------------------------------------------

    def topology(self, data: Any) -> Topology:
        doc = self.mapping(data, "", TOP_KEYS)
        name = doc.get("name", self.source.stem)
        if not isinstance(name, str) or not name.strip():
            raise self.fail("name", f"must be a non-empty string {got(name)}")
        tcp_cc = self.choice(doc.get("tcp_cc", "cubic"), "tcp_cc", TCP_CCS)
        if "nodes" not in doc:
            raise self.fail("nodes", "missing (a mapping of node name -> {role: ...})")
        nodes = self.nodes(doc["nodes"])
        links = self.links(doc.get("links", []), nodes)
        topo = Topology(name=name, source=self.source, nodes=nodes, links=links, tcp_cc=tcp_cc)
        self.check_cells(topo)
        self.check_connected(topo)
        return topo

    def nodes(self, value: Any) -> dict[str, NodeSpec]:
        if not isinstance(value, Mapping) or not value:
            raise self.fail("nodes", f"must be a non-empty mapping of name -> {{role: ...}} {got(value)}")
        nodes: dict[str, NodeSpec] = {}
        for name, body in value.items():
            self.node_name(name)
            nodes[name] = self.node(name, body)
        if not any(n.role != "cell" for n in nodes.values()):
            raise self.fail("nodes", "needs at least one device, edge or cloud node (only cells given)")
        return nodes

    def node_name(self, name: Any) -> None:
        field = f"nodes.{name}"
        if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
            raise self.fail(field, "node names must be 1-10 letters/digits starting with a letter "
                                   f"(they become interface names NAME-ethN) {got(name)}")
        if name.lower().startswith(RESERVED_PREFIX):
            raise self.fail(field, f"names starting with {RESERVED_PREFIX!r} are reserved by the testbed "
                                   f"{got(name)}")

    def node(self, name: str, body: Any) -> NodeSpec:
        field = f"nodes.{name}"
        body = self.mapping(body, field, NODE_KEYS)
        if "role" not in body:
            raise self.fail(f"{field}.role", f"missing (one of {', '.join(ROLES)})")
        role = self.choice(body["role"], f"{field}.role", ROLES)
        if role == "cell":
            for key in ("cpu", "memory_mb", "runtime"):
                if key in body:
                    raise self.fail(f"{field}.{key}", "not allowed on a cell (a cell is a bridge, "
                                                      f"not a host) {got(body[key])}")
        cpu = None
        if body.get("cpu") is not None:
            cpu = self.number(body["cpu"], f"{field}.cpu")
            if cpu <= 0:
                raise self.fail(f"{field}.cpu", f"must be > 0 (share of one core) {got(body['cpu'])}")
        memory = None
        if body.get("memory_mb") is not None:
            memory = self.integer(body["memory_mb"], f"{field}.memory_mb")
            if memory < MIN_MEMORY_MB:
                raise self.fail(f"{field}.memory_mb", f"must be >= {MIN_MEMORY_MB} {got(memory)}")
        runtime = self.choice(body.get("runtime", "process"), f"{field}.runtime", RUNTIMES)
        return NodeSpec(name=name, role=role, cpu=cpu, memory_mb=memory, runtime=runtime)

    def links(self, value: Any, nodes: dict[str, NodeSpec]) -> list[LinkSpec]:
        if value is None:
            value = []
        if not isinstance(value, list):
            raise self.fail("links", f"must be a list of links {got(value)}")
        links: list[LinkSpec] = []
        seen: dict[frozenset[str], int] = {}
        for i, body in enumerate(value):
            field = f"links[{i}]"
            body = self.mapping(body, field, LINK_KEYS)
            a, b = self.between(body.get("between"), f"{field}.between", nodes)
            pair = frozenset((a, b))
            if pair in seen:
                raise self.fail(f"{field}.between", f"duplicate link (same nodes as links[{seen[pair]}]) "
                                                    f"{got([a, b])}")
            seen[pair] = i
            up = self.shaping(body.get("up"), f"{field}.up")
            down = self.shaping(body.get("down"), f"{field}.down")
            links.append(LinkSpec(a=a, b=b, up=up, down=down))
        return links

    def between(self, value: Any, field: str, nodes: dict[str, NodeSpec]) -> tuple[str, str]:
        if value is None:
            raise self.fail(field, "missing (a list of two node names)")
        if not isinstance(value, list) or len(value) != 2:
            raise self.fail(field, f"must be a list of two node names {got(value)}")
        for end in value:
            if not isinstance(end, str) or end not in nodes:
                raise self.fail(field, f"unknown node {got(end)}")
        a, b = value
        if a == b:
            raise self.fail(field, f"a node cannot link to itself {got(value)}")
        if nodes[a].role == "cell" and nodes[b].role == "cell":
            raise self.fail(field, f"two cells cannot be linked directly {got(value)}")
        return a, b

    def shaping(self, value: Any, field: str) -> Shaping:
        if value is None:
            return Shaping()
        body = self.mapping(value, field, DIRECTION_KEYS)
        kw: dict[str, Any] = {}
        if body.get("bw_mbit") is not None:
            bw = self.number(body["bw_mbit"], f"{field}.bw_mbit")
            if bw <= 0:
                raise self.fail(f"{field}.bw_mbit", f"must be > 0 {got(body['bw_mbit'])}")
            kw["bw_mbit"] = bw
        for key in ("delay_ms", "jitter_ms"):
            if body.get(key) is not None:
                kw[key] = self.number(body[key], f"{field}.{key}")
                if kw[key] < 0:
                    raise self.fail(f"{field}.{key}", f"must be >= 0 {got(body[key])}")
        if kw.get("jitter_ms", 0.0) > kw.get("delay_ms", 0.0):
            raise self.fail(f"{field}.jitter_ms", f"must be <= delay_ms ({kw.get('delay_ms', 0.0):g}) "
                                                  f"{got(body['jitter_ms'])}")
        if body.get("loss_pct") is not None:
            loss = self.number(body["loss_pct"], f"{field}.loss_pct")
            if not 0 <= loss <= 100:
                raise self.fail(f"{field}.loss_pct", f"must be in [0, 100] {got(body['loss_pct'])}")
            kw["loss_pct"] = loss
        if body.get("queue_pkts") is not None:
            q = self.integer(body["queue_pkts"], f"{field}.queue_pkts")
            if q < 1:
                raise self.fail(f"{field}.queue_pkts", f"must be >= 1 {got(q)}")
            kw["queue_pkts"] = q
        kw.update(self.trace(body, field))
        return Shaping(**kw)

    def trace(self, body: Mapping[str, Any], field: str) -> dict[str, Any]:
        if body.get("trace") is None:
            if body.get("format") is not None:
                raise self.fail(f"{field}.format", f"only meaningful with a trace {got(body['format'])}")
            return {}
        raw = body["trace"]
        if not isinstance(raw, str) or not raw.strip():
            raise self.fail(f"{field}.trace", f"must be a file path {got(raw)}")
        if body.get("bw_mbit") is not None:
            raise self.fail(f"{field}.bw_mbit", f"cannot be combined with a trace (the trace sets the rate) "
                                                f"{got(body['bw_mbit'])}")
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = self.source.resolve().parent / path
        path = path.resolve()
        fmt = body.get("format")
        if fmt is not None:
            self.choice(fmt, f"{field}.format", FORMATS)
        fmt = fmt or infer_format(path)
        load_trace(path, fmt, source=self.source, field=f"{field}.trace")
        return {"trace": path, "format": fmt}

    # -- whole-graph checks ----------------------------------------------------------------

    def check_cells(self, topo: Topology) -> None:
        for cell in topo.cells():
            n = len(topo.links_of(cell.name))
            if n < 2:
                raise self.fail(f"nodes.{cell.name}", f"a cell needs at least 2 links (got {n})")

    def check_connected(self, topo: Topology) -> None:
        names = list(topo.nodes)
        reached = {names[0]}
        todo = [names[0]]
        while todo:
            for nb in topo.neighbors(todo.pop()):
                if nb not in reached:
                    reached.add(nb)
                    todo.append(nb)
        cut = [n for n in names if n not in reached]
        if cut:
            raise self.fail("links", f"the graph is not connected: {', '.join(cut)} cannot reach "
                                     f"{names[0]} (got {len(topo.links)} links)")
