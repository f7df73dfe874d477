"""Placement strings: parsing and one-line errors against a topology and a layer count."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.apps.inference.placement import Stage, parse_placement
from testbed.spec.errors import SpecError
from testbed.spec.topology import load_topology

TOPO = Path(__file__).resolve().parents[3] / "topologies" / "device-edge-cloud.yaml"


def test_valid_placement() -> None:
    topo = load_topology(TOPO)
    got = parse_placement("phone=0:8, mec=8:20,cloud=20:30", topo, 30)
    assert got == [Stage("phone", 0, 8), Stage("mec", 8, 20), Stage("cloud", 20, 30)]
    assert [s.layers for s in got] == ["0:8", "8:20", "20:30"]
    assert parse_placement("cloud=0:30", topo, 30) == [Stage("cloud", 0, 30)]


@pytest.mark.parametrize(("text", "why"), [
    ("", "expected node=START:END"),
    ("phone=0:8,", "expected node=START:END"),
    ("phone", "integer layers"),
    ("phone=a:b", "integer layers"),
    ("=0:30", "integer layers"),
    ("phone=8:8,mec=8:30", "empty layer range"),
    ("phone=0:8,mec=9:30", "ends at 8"),
    ("phone=2:30", "start at layer 0"),
    ("phone=0:8,mec=8:29", "must end at layer 30"),
    ("phone=0:8,phone=8:30", "placed twice"),
    ("phone=0:8,moon=8:30", "no such node"),
])
def test_bad_placements(text: str, why: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_placement(text, load_topology(TOPO), 30)
    line = str(e.value)
    assert line.startswith("--placement: ") and why in line and "\n" not in line


def test_cell_cannot_run_a_shard(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text("name: split\nnodes:\n  a: {role: device}\n  b: {role: edge}\n  c: {role: cloud}\n"
                 "  cell0: {role: cell}\nlinks:\n  - between: [a, cell0]\n  - between: [b, cell0]\n"
                 "  - between: [b, c]\n")
    topo = load_topology(p)
    assert len(parse_placement("a=0:1,b=1:2", topo, 2)) == 2
    assert len(parse_placement("a=0:1,c=1:2", topo, 2)) == 2  # routed through b
    with pytest.raises(SpecError, match="cell"):
        parse_placement("a=0:1,cell0=1:2", topo, 2)
