"""Checking topology YAML data and building the typed model (``testbed.spec.topology``).

Every problem raises one SpecError ``FILE: field.path: what is wrong (got VALUE)``; the checks and
the bounds of each number are those of ``testbed.spec.check`` (shared with suites, traces and flags).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from testbed.spec import check
from testbed.spec.check import Checker
from testbed.spec.errors import got
from testbed.spec.events import parse_events
from testbed.spec.options import ROLES, RUNTIMES, SECURITY, TCP_CCS, TRACE_FORMATS
from testbed.spec.topology import LinkSpec, NodeSpec, Shaping, Topology
from testbed.spec.traces import infer_format, load_trace
from testbed.spec.yamlfile import load_yaml

TOP_KEYS = ("name", "description", "tcp_cc", "security", "nodes", "links", "events")
NODE_KEYS = ("role", "cpu", "memory_mb", "runtime", "kv_budget_mb", "kv_int8")
LINK_KEYS = ("between", "up", "down")
DIRECTION_KEYS = ("bw_mbit", "delay_ms", "jitter_ms", "loss_pct", "queue_pkts", "trace", "format",
                  "trace_start_s")
NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]{0,9}")
RESERVED_PREFIX = "tb"

__all__ = ["got", "load_topology", "parse_topology", "check_direction_field", "check_node_field"]


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology YAML file."""
    return parse_topology(load_yaml(path), Path(path))


def parse_topology(data: Any, source: Path) -> Topology:
    """Validate loaded YAML data against the topology schema."""
    return _Parser(Path(source)).topology(data)


def check_direction_field(checker: Checker, field: str, key: str, value: Any) -> Any:
    """One field of a link direction on its own (a suite's ``links.A-B.up.KEY`` parameter).

    Rules between fields (jitter <= delay, no rate with a trace) are checked when the whole
    topology is parsed.
    """
    if key == "trace_start_s":
        return checker.number(value, field, check.TRACE_START_S)
    if key in ("trace", "format"):
        return checker.choice(value, field, TRACE_FORMATS) if key == "format" else \
            checker.text(value, field, "a trace file path")
    return checker.number(value, field, check.BOUNDS[key])


def check_node_field(checker: Checker, field: str, key: str, value: Any) -> Any:
    """One field of a node on its own (a suite's ``nodes.N.KEY`` parameter)."""
    if key == "runtime":
        return checker.choice(value, field, RUNTIMES)
    if key == "kv_int8":
        return checker.boolean(value, field)
    return checker.number(value, field, check.BOUNDS[key])


class _Parser(Checker):
    def __init__(self, source: Path) -> None:
        super().__init__(source)
        self.source = source

    # -- the document --------------------------------------------------------------------

    def topology(self, data: Any) -> Topology:
        doc = self.mapping(data, "", TOP_KEYS)
        name = doc.get("name", self.source.stem)
        if not isinstance(name, str) or not name.strip():
            raise self.fail("name", f"must be a non-empty string {got(name)}")
        tcp_cc = self.choice(doc.get("tcp_cc", "cubic"), "tcp_cc", TCP_CCS)
        security = self.choice(doc.get("security", "none"), "security", SECURITY)
        if "nodes" not in doc:
            raise self.fail("nodes", "missing (a mapping of node name -> {role: ...})")
        nodes = self.nodes(doc["nodes"])
        links = self.links(doc.get("links", []), nodes)
        topo = Topology(name=name, source=self.source, nodes=nodes, links=links, tcp_cc=tcp_cc,
                        security=security)
        self.check_cells(topo)
        self.check_connected(topo)
        if doc.get("events") is not None:
            topo.events = parse_events(doc["events"], topo, self.source)
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
            for key in ("cpu", "memory_mb", "runtime", "kv_budget_mb", "kv_int8"):
                if key in body:
                    raise self.fail(f"{field}.{key}", "not allowed on a cell (a cell is a bridge, "
                                                      f"not a host) {got(body[key])}")
        cpu = None
        if body.get("cpu") is not None:
            cpu = self.number(body["cpu"], f"{field}.cpu", check.CPU)
        memory = None
        if body.get("memory_mb") is not None:
            memory = self.number(body["memory_mb"], f"{field}.memory_mb", check.MEMORY_MB)
        runtime = self.choice(body.get("runtime", "process"), f"{field}.runtime", RUNTIMES)
        kv_budget = None
        if body.get("kv_budget_mb") is not None:
            kv_budget = self.number(body["kv_budget_mb"], f"{field}.kv_budget_mb", check.KV_BUDGET_MB)
        kv_int8 = self.boolean(body.get("kv_int8", False), f"{field}.kv_int8")
        return NodeSpec(name=name, role=role, cpu=cpu, memory_mb=memory, runtime=runtime,
                        kv_budget_mb=kv_budget, kv_int8=kv_int8)

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
        for key in ("bw_mbit", "delay_ms", "jitter_ms", "loss_pct", "queue_pkts"):
            if body.get(key) is not None:
                kw[key] = self.number(body[key], f"{field}.{key}", check.BOUNDS[key])
        if kw.get("jitter_ms", 0.0) > kw.get("delay_ms", 0.0):
            raise self.fail(f"{field}.jitter_ms", f"must be <= delay_ms ({kw.get('delay_ms', 0.0):g}) "
                                                  f"{got(body['jitter_ms'])}")
        kw.update(self.trace(body, field))
        return Shaping(**kw)

    def trace(self, body: Mapping[str, Any], field: str) -> dict[str, Any]:
        if body.get("trace") is None:
            for key in ("format", "trace_start_s"):
                if body.get(key) is not None:
                    raise self.fail(f"{field}.{key}", f"only meaningful with a trace {got(body[key])}")
            return {}
        raw = body["trace"]
        if not isinstance(raw, str) or not raw.strip():
            raise self.fail(f"{field}.trace", f"must be a file path {got(raw)}")
        if body.get("bw_mbit") is not None:
            raise self.fail(f"{field}.bw_mbit", f"cannot be combined with a trace (the trace sets the rate) "
                                                f"{got(body['bw_mbit'])}")
        path = Path(os.path.expanduser(raw))  # unlike Path.expanduser, ~nosuchuser stays as written
        if not path.is_absolute():
            path = self.source.resolve().parent / path
        path = path.resolve()
        fmt = body.get("format")
        if fmt is not None:
            self.choice(fmt, f"{field}.format", TRACE_FORMATS)
        fmt = fmt or infer_format(path)
        load_trace(path, fmt, source=self.source, field=f"{field}.trace")
        out: dict[str, Any] = {"trace": path, "format": fmt}
        if body.get("trace_start_s") is not None:
            out["trace_start_s"] = self.number(body["trace_start_s"], f"{field}.trace_start_s",
                                               check.TRACE_START_S)
        return out

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
