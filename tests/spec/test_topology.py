"""Topology files: the shipped ones load; every bad input is one line naming file, field and value."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.spec.errors import SpecError
from testbed.spec.topology import Shaping, Topology, load_topology, parse_topology

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "topologies").glob("*.yaml"))

BASE: dict[str, Any] = {
    "name": "t",
    "nodes": {"phone": {"role": "device", "cpu": 0.5}, "mec": {"role": "edge"}, "cloud": {"role": "cloud"}},
    "links": [
        {"between": ["phone", "mec"], "up": {"bw_mbit": 10, "delay_ms": 15, "jitter_ms": 2},
         "down": {"bw_mbit": 50, "delay_ms": 15}},
        {"between": ["mec", "cloud"], "up": {"bw_mbit": 1000, "delay_ms": 25}},
    ],
}


def test_all_shipped_topologies_load() -> None:
    names = {p.name for p in SHIPPED}
    assert {"two-node.yaml", "device-edge-cloud.yaml", "cell-4.yaml", "chain-4hop.yaml",
            "trace-lte.yaml"} <= names
    for path in SHIPPED:
        topo = load_topology(path)
        assert isinstance(topo, Topology) and topo.hosts(), path


def test_device_edge_cloud_is_the_documented_example() -> None:
    topo = load_topology(REPO / "topologies/device-edge-cloud.yaml")
    assert topo.name == "phone-mec" and topo.tcp_cc == "cubic"
    assert {n: s.role for n, s in topo.nodes.items()} == {"phone": "device", "mec": "edge", "cloud": "cloud"}
    assert topo.nodes["phone"].cpu == 0.5 and topo.nodes["phone"].runtime == "process"
    first = topo.links[0]
    assert (first.a, first.b) == ("phone", "mec")
    assert first.up == Shaping(bw_mbit=10, delay_ms=15, jitter_ms=2, loss_pct=0.5, queue_pkts=100)
    assert first.down == Shaping(bw_mbit=50, delay_ms=15)
    assert topo.neighbors("mec") == ["phone", "cloud"]


def test_cell_and_chain_shapes() -> None:
    cell = load_topology(REPO / "topologies/cell-4.yaml")
    assert [c.name for c in cell.cells()] == ["cell1"]
    assert sorted(cell.neighbors("cell1")) == ["dev1", "dev2", "dev3", "dev4", "mec"]
    assert len(cell.hosts()) == 6
    chain = load_topology(REPO / "topologies/chain-4hop.yaml")
    assert [(lk.a, lk.b) for lk in chain.links] == [
        ("phone", "edge1"), ("edge1", "edge2"), ("edge2", "edge3"), ("edge3", "cloud")]


def test_trace_paths_resolve_against_the_yaml_directory() -> None:
    topo = load_topology(REPO / "topologies/trace-lte.yaml")
    up, down = topo.links[0].up, topo.links[0].down
    assert up.trace == (REPO / "topologies/traces/ge-lte.up").resolve()
    assert down.trace == (REPO / "topologies/traces/ge-lte.down").resolve()
    assert up.trace.is_absolute() and up.format == "mahimahi" and down.format == "mahimahi"
    assert up.delay_ms == 20 and up.bw_mbit is None
    assert topo.traces() == [up.trace, down.trace]
    assert Shaping.from_dict(up.to_dict()) == up


def test_csv_trace_format_is_inferred(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("time_s,bw_mbit\n0,10\n1,5\n")
    data = copy.deepcopy(BASE)
    data["links"][0]["up"] = {"trace": "r.csv", "delay_ms": 5}
    topo = parse_topology(data, tmp_path / "t.yaml")
    assert topo.links[0].up.format == "csv" and topo.links[0].up.trace == tmp_path / "r.csv"


def test_defaults_and_optional_fields(tmp_path: Path) -> None:
    data = {"nodes": {"a": {"role": "device", "memory_mb": 256, "runtime": "docker"}, "b": {"role": "edge"}},
            "links": [{"between": ["a", "b"]}], "tcp_cc": "bbr"}
    topo = parse_topology(data, tmp_path / "mini.yaml")
    assert topo.name == "mini" and topo.tcp_cc == "bbr"
    assert topo.nodes["a"].memory_mb == 256 and topo.nodes["a"].runtime == "docker"
    assert topo.links[0].up == Shaping() and topo.links[0].down == Shaping()


# -- bad input ---------------------------------------------------------------------------

def edit(fn: Callable[[dict[str, Any]], None]) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        d = copy.deepcopy(BASE)
        fn(d)
        return d
    return make


def up0(**kw: Any) -> Callable[[], dict[str, Any]]:
    return edit(lambda d: d["links"][0]["up"].update(kw))


def rename(old: str, new: str) -> Callable[[], dict[str, Any]]:
    def fn(d: dict[str, Any]) -> None:
        d["nodes"][new] = d["nodes"].pop(old)
        for lk in d["links"]:
            lk["between"] = [new if x == old else x for x in lk["between"]]
    return edit(fn)


def with_cell_links(n: int) -> Callable[[], dict[str, Any]]:
    def fn(d: dict[str, Any]) -> None:
        d["nodes"]["cell1"] = {"role": "cell"}
        d["links"] += [{"between": ["phone", "cell1"]}][:n]
    return edit(fn)


# (case id, data factory, expected field, text that must appear, including the bad value)
BAD: list[tuple[str, Callable[[], dict[str, Any]], str, str]] = [
    ("top-level-key", edit(lambda d: d.update(nodez=1)), "nodez", "unknown key 'nodez'"),
    ("node-key", edit(lambda d: d["nodes"]["phone"].update(gpu=1)), "nodes.phone.gpu", "unknown key 'gpu'"),
    ("link-key", edit(lambda d: d["links"][1].update(latency=3)), "links[1].latency",
     "unknown key 'latency'"),
    ("direction-key", up0(bandwidth=5), "links[0].up.bandwidth", "unknown key 'bandwidth'"),
    ("name-digit", rename("phone", "9phone"), "nodes.9phone", "(got '9phone')"),
    ("name-long", rename("phone", "smartphone1"), "nodes.smartphone1", "(got 'smartphone1')"),
    ("name-dash", rename("phone", "ph-one"), "nodes.ph-one", "(got 'ph-one')"),
    ("name-reserved", rename("phone", "tbphone"), "nodes.tbphone", "reserved by the testbed (got 'tbphone')"),
    ("role", edit(lambda d: d["nodes"]["mec"].update(role="server")), "nodes.mec.role",
     "must be one of device, edge, cloud, cell (got 'server')"),
    ("role-missing", edit(lambda d: d["nodes"]["mec"].pop("role")), "nodes.mec.role", "missing"),
    ("cpu-zero", edit(lambda d: d["nodes"]["phone"].update(cpu=0)), "nodes.phone.cpu", "must be > 0"),
    ("cpu-negative", edit(lambda d: d["nodes"]["phone"].update(cpu=-0.5)), "nodes.phone.cpu", "(got -0.5)"),
    ("cpu-string", edit(lambda d: d["nodes"]["phone"].update(cpu="half")), "nodes.phone.cpu",
     "must be a finite number (got 'half')"),
    ("memory", edit(lambda d: d["nodes"]["phone"].update(memory_mb=8)), "nodes.phone.memory_mb",
     "must be an integer >= 16 (got 8)"),
    ("runtime", edit(lambda d: d["nodes"]["phone"].update(runtime="vm")), "nodes.phone.runtime",
     "(got 'vm')"),
    ("unknown-node", edit(lambda d: d["links"][1].update(between=["mec", "ghost"])), "links[1].between",
     "unknown node (got 'ghost')"),
    ("self-link", edit(lambda d: d["links"][1].update(between=["mec", "mec"])), "links[1].between",
     "cannot link to itself (got ['mec', 'mec'])"),
    ("duplicate-link", edit(lambda d: d["links"].append({"between": ["mec", "phone"]})), "links[2].between",
     "duplicate link (same nodes as links[0]) (got ['mec', 'phone'])"),
    ("between-three", edit(lambda d: d["links"][0].update(between=["phone", "mec", "cloud"])),
     "links[0].between", "must be a list of two node names"),
    ("bw-negative", up0(bw_mbit=-5), "links[0].up.bw_mbit", "must be > 0 (got -5)"),
    ("bw-zero", up0(bw_mbit=0), "links[0].up.bw_mbit", "must be > 0 (got 0)"),
    ("bw-string", up0(bw_mbit="fast"), "links[0].up.bw_mbit", "must be a finite number (got 'fast')"),
    ("bw-infinite", up0(bw_mbit=float("inf")), "links[0].up.bw_mbit", "must be a finite number (got inf)"),
    ("delay-negative", up0(delay_ms=-1), "links[0].up.delay_ms", "must be >= 0 (got -1)"),
    ("jitter-gt-delay", up0(jitter_ms=20), "links[0].up.jitter_ms", "must be <= delay_ms (15) (got 20)"),
    ("loss-high", up0(loss_pct=101), "links[0].up.loss_pct", "must be <= 100 (got 101)"),
    ("loss-negative", up0(loss_pct=-1), "links[0].up.loss_pct", "(got -1)"),
    ("queue-zero", up0(queue_pkts=0), "links[0].up.queue_pkts", "must be an integer >= 1 (got 0)"),
    ("queue-float", up0(queue_pkts=2.5), "links[0].up.queue_pkts", "must be an integer >= 1 (got 2.5)"),
    ("trace-missing", edit(lambda d: d["links"][0].update(up={"trace": "no/such.up"})), "links[0].up.trace",
     "no/such.up: trace file not found"),
    ("trace-and-bw", up0(trace="x.up"), "links[0].up.bw_mbit",
     "cannot be combined with a trace (the trace sets the rate) (got 10)"),
    ("trace-format", edit(lambda d: d["links"][0].update(up={"trace": "x.up", "format": "pcap"})),
     "links[0].up.format", "(got 'pcap')"),
    ("not-connected", edit(lambda d: d["links"].pop(1)), "links", "not connected: cloud"),
    ("cell-one-link", with_cell_links(1), "nodes.cell1", "a cell needs at least 2 links (got 1)"),
    ("tcp-cc", edit(lambda d: d.update(tcp_cc="vegas")), "tcp_cc",
     "must be one of cubic, reno, bbr (got 'vegas')"),
    ("nodes-empty", edit(lambda d: d.update(nodes={})), "nodes", "must be a non-empty mapping"),
    ("node-not-mapping", edit(lambda d: d["nodes"].update(mec="edge")), "nodes.mec",
     "must be a mapping (got 'edge')"),
]


def write_yaml(tmp_path: Path, data: Any) -> Path:
    (tmp_path / "x.up").write_text("1\n")
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def expect_one_line(text: str, path: Path, field: str, fragment: str) -> None:
    assert "\n" not in text.strip(), text
    assert text.strip().startswith(f"{path}: {field}: "), text
    assert fragment in text, text


@pytest.mark.parametrize(("factory", "field", "fragment"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_with_field_and_value(tmp_path: Path, factory, field: str,
                                                    fragment: str) -> None:
    path = write_yaml(tmp_path, factory())
    with pytest.raises(SpecError) as e:
        load_topology(path)
    assert e.value.field == field
    expect_one_line(str(e.value), path, field, fragment)


def test_bad_trace_line_names_trace_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.up").write_text("1\n2\noops\n")
    data = copy.deepcopy(BASE)
    data["links"][0]["down"] = {"trace": "bad.up"}
    path = write_yaml(tmp_path, data)
    with pytest.raises(SpecError) as e:
        load_topology(path)
    expect_one_line(str(e.value), path, "links[0].down.trace", f"{tmp_path / 'bad.up'} line 3: ")


def test_trace_without_delivery_opportunity(tmp_path: Path) -> None:
    (tmp_path / "dead.csv").write_text("time_s,bw_mbit\n0,0\n")
    data = copy.deepcopy(BASE)
    data["links"][0]["up"] = {"trace": "dead.csv"}
    path = write_yaml(tmp_path, data)
    with pytest.raises(SpecError) as e:
        load_topology(path)
    expect_one_line(str(e.value), path, "links[0].up.trace", "no delivery opportunity")


@pytest.mark.parametrize(("text", "field", "fragment"), [
    ("nodes: [a, b\n", "yaml", "line 2"),
    ("nodes:\n  a: {role: device}\n  a: {role: edge}\n", "yaml",
     "line 3, column 3: duplicate key 'a' (first on line 2)"),
    ("- just\n- a list\n", "(top level)", "must be a mapping (got ['just', 'a list'])"),
    ("name: x\n", "nodes", "missing"),
])
def test_yaml_level_errors(tmp_path: Path, text: str, field: str, fragment: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as e:
        load_topology(path)
    expect_one_line(str(e.value), path, field, fragment)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


@pytest.mark.parametrize(("factory", "field", "fragment"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_cli_validate_bad_input_exits_2_with_one_stderr_line(tmp_path: Path, factory, field: str,
                                                             fragment: str) -> None:
    path = write_yaml(tmp_path, factory())
    r = run_cli("validate", str(path))
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1, r.stderr
    expect_one_line(r.stderr, path, field, fragment)


def test_cli_validate_ok_prints_one_line_and_json() -> None:
    r = run_cli("validate", "topologies/cell-4.yaml")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.strip() == ("topologies/cell-4.yaml: OK: cell-4: 7 nodes (4 device, 1 edge, 1 cloud, "
                                "1 cell), 6 links, tcp_cc cubic")
    r = run_cli("validate", "--json", "topologies/trace-lte.yaml")
    assert r.returncode == 0
    d = json.loads(r.stdout)
    assert d["name"] == "trace-lte" and d["links"][0]["between"] == ["phone", "mec"]
    assert Path(d["links"][0]["up"]["trace"]).is_absolute()
