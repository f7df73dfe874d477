"""Address plan: segments, subnets, per-host addresses and shortest-path routes (no root)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from testbed.net.addressing import plan
from testbed.spec.errors import SpecError
from testbed.spec.topology import LinkSpec, NodeSpec, Topology


def topo(nodes: dict[str, str], links: list[tuple[str, str]]) -> Topology:
    return Topology("t", Path("t.yaml"), {n: NodeSpec(n, r) for n, r in nodes.items()},
                    [LinkSpec(a, b) for a, b in links])


def test_chain_segments_and_routes():
    t = topo({"a": "device", "b": "edge", "c": "edge", "d": "cloud"}, [("a", "b"), ("b", "c"), ("c", "d")])
    p = plan(t)
    assert [str(s.subnet) for s in p.segments] == ["10.1.0.0/24", "10.1.1.0/24", "10.1.2.0/24"]
    assert p.address("a", 0) == "10.1.0.1" and p.address("b", 0) == "10.1.0.2"
    assert p.address("b", 1) == "10.1.1.1" and p.address("c", 1) == "10.1.1.2"
    # a reaches the far segments through b, d through c
    assert dict(p.routes["a"]) == {"10.1.1.0/24": "10.1.0.2", "10.1.2.0/24": "10.1.0.2"}
    assert dict(p.routes["d"]) == {"10.1.0.0/24": "10.1.2.1", "10.1.1.0/24": "10.1.2.1"}
    # middle hosts route each way
    assert dict(p.routes["b"]) == {"10.1.2.0/24": "10.1.1.2"}
    assert p.ip("b", "a") == "10.1.0.2" and p.ip("b", "d") == "10.1.1.1"
    assert p.ip("a") == "10.1.0.1"


def test_cell_is_one_segment_with_every_member():
    t = topo({"d1": "device", "d2": "device", "cell": "cell", "mec": "edge", "cloud": "cloud"},
             [("d1", "cell"), ("d2", "cell"), ("cell", "mec"), ("mec", "cloud")])
    p = plan(t)
    cell = p.segments[0]
    assert cell.cell == "cell" and cell.members == ["d1", "d2", "mec"] and cell.links == [0, 1, 2]
    assert p.link_segment == [0, 0, 0, 1]
    assert dict(p.routes["d1"]) == {"10.1.1.0/24": "10.1.0.3"}
    assert dict(p.routes["cloud"]) == {"10.1.0.0/24": "10.1.1.1"}
    assert p.ip("d2", "cloud") == "10.1.0.2"


def test_every_address_unique_and_inside_its_subnet():
    nodes = {f"d{i}": "device" for i in range(40)} | {"c1": "cell", "c2": "cell", "e": "edge"}
    links = [(f"d{i}", "c1" if i % 2 else "c2") for i in range(40)] + [("c1", "e"), ("c2", "e")]
    p = plan(topo(nodes, links))
    addrs = list(p.addresses.values())
    assert len(addrs) == len(set(addrs)) == 42
    for (_h, s), a in p.addresses.items():
        assert ipaddress.IPv4Address(a) in p.segments[s].subnet


def test_cells_joined_by_a_link_share_a_segment():
    p = plan(topo({"a": "device", "b": "device", "c1": "cell", "c2": "cell"},
                  [("a", "c1"), ("c1", "c2"), ("c2", "b")]))
    assert len(p.segments) == 1 and p.segments[0].members == ["a", "b"]
    assert p.routes["a"] == [] and p.ip("a", "b") == "10.1.0.1"


def test_unreachable_peer_and_double_attachment():
    p = plan(topo({"a": "device", "b": "edge", "x": "device", "y": "edge"}, [("a", "b"), ("x", "y")]))
    assert dict(p.routes["a"]) == {}
    with pytest.raises(KeyError):
        p.ip("a", "y")
    with pytest.raises(SpecError, match="linked twice"):
        plan(topo({"a": "device", "c": "cell"}, [("a", "c"), ("a", "c")]))


def test_subnets_beyond_256_segments():
    nodes = {f"h{i}": "device" for i in range(300)}
    p = plan(topo(nodes, [(f"h{i}", f"h{i + 1}") for i in range(299)]))
    assert str(p.segments[256].subnet) == "10.2.0.0/24"
