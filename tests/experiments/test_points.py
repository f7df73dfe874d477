"""Sweep expansion (cartesian, zip, dedup), placements, --only filters and topology overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testbed.experiments.points import build_topology, expand, topology_data
from testbed.spec.suite import load_suite

REPO = Path(__file__).resolve().parents[2]


def make(tmp_path: Path, topology: str = "device-edge-cloud.yaml", **top) -> Path:
    data = {
        "name": "t",
        "topology": str(REPO / "topologies" / topology),
        "workload": {"prompts": str(REPO / "experiments/prompts/short.yaml"), "max_new_tokens": 4},
        "placements": {"split": "phone=0:{cut},mec={cut}:{layers}"},
        "params": {"prompt": "capital"},
    }
    data.update(top)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_cartesian_with_dedup(tmp_path):
    suite = load_suite(
        make(tmp_path, sweep={"uplink_mbit": [1, 10, 100], "cut": [2, 8], "codec": ["fp32", "int8"]})
    )
    points = expand(suite, 30)
    ids = [p.id for p in points]
    assert len(ids) == len(set(ids))
    by_kind = {
        k: [p for p in points if p.kind == k] for k in ("on-device", "edge-offload", "cloud-offload", "split")
    }
    assert len(by_kind["on-device"]) == 1  # ignores network, cut and codec
    assert len(by_kind["edge-offload"]) == 3 and len(by_kind["cloud-offload"]) == 3  # ignore cut and codec
    assert len(by_kind["split"]) == 3 * 2 * 2
    split = next(p for p in points if p.id == "split/uplink_mbit=10,cut=8,codec=int8")
    assert split.placement == "phone=0:8,mec=8:30"
    assert split.params["codec"] == "int8" and split.params["kv_cache"] is True
    assert by_kind["on-device"][0].placement == "phone=0:30"
    assert by_kind["edge-offload"][0].placement == "phone=0:0,mec=0:30"
    assert by_kind["cloud-offload"][0].placement == "phone=0:0,cloud=0:30"


def test_zip(tmp_path):
    suite = load_suite(
        make(
            tmp_path,
            baselines=[],
            params={"prompt": "capital", "cut": 4},
            sweep={"mode": "zip", "uplink_mbit": [1, 2, 3], "downlink_mbit": [10, 20, 30]},
        )
    )
    points = expand(suite, 30)
    assert [(p.params["uplink_mbit"], p.params["downlink_mbit"]) for p in points] == [
        (1, 10),
        (2, 20),
        (3, 30),
    ]


def test_prompts_become_a_dimension(tmp_path):
    suite = load_suite(make(tmp_path, params={"cut": 4}, baselines=["on-device"]))
    points = expand(suite, 30)
    assert sorted({p.params["prompt"] for p in points}) == ["capital", "haiku", "tips"]


def test_only_filter(tmp_path):
    suite = load_suite(make(tmp_path, params={"prompt": "capital", "cut": 4}, sweep={"uplink_mbit": [1, 10]}))
    points = expand(suite, 30)
    assert [p.id for p in points if p.matches("placement=split,uplink_mbit=10")] == ["split/uplink_mbit=10"]
    assert {p.kind for p in points if p.matches("offload")} == {"edge-offload", "cloud-offload"}
    assert all(p.matches(None) for p in points)
    assert all(p.matches("kv_cache=true") and p.matches("kv_cache=on") for p in points)
    assert not any(p.matches("kv_cache=off") for p in points)


def test_network_overrides_hit_the_device_access_link(tmp_path):
    trace = REPO / "topologies/traces/ge-lte"
    suite = load_suite(
        make(
            tmp_path,
            params={
                "prompt": "capital",
                "cut": 4,
                "device_cpu": 0.25,
                "delay_ms": 3,
                "links.cloud-mec.up.bw_mbit": 77,
            },
            sweep={"uplink_mbit": [7], "trace": [str(trace)]},
        )
    )
    split = next(p for p in expand(suite, 30) if p.kind == "split")
    data = topology_data(suite, split)
    access = data["links"][0]
    assert access["between"] == ["phone", "mec"]
    assert access["up"]["trace"] == f"{trace}.up" and "bw_mbit" not in access["up"]  # trace wins over rate
    assert access["down"]["trace"] == f"{trace}.down"
    assert access["up"]["delay_ms"] == access["down"]["delay_ms"] == 3
    assert access["up"]["jitter_ms"] <= 3
    assert data["nodes"]["phone"]["cpu"] == 0.25
    backhaul = data["links"][1]
    assert backhaul["between"] == ["mec", "cloud"] and backhaul["down"]["bw_mbit"] == 77  # cloud -> mec
    topo = build_topology(suite, split)
    assert topo.links[0].up.trace == Path(f"{trace}.up")
    assert topo.nodes["phone"].cpu == 0.25


def test_multi_device_renames_devices(tmp_path):
    suite = load_suite(REPO / "experiments/multi-device.yaml")
    four = next(p for p in expand(suite, 30) if p.kind == "split" and p.params["devices"] == 4)
    assert four.placement == "dev1=0:4,mec=4:30"
    from testbed.experiments.points import device_nodes

    assert device_nodes(suite, 4) == ["dev1", "dev2", "dev3", "dev4"]


def test_baseline_placements_are_valid_placements():
    from testbed.apps.inference.placement import parse_placement
    from testbed.spec.errors import SpecError

    suite = load_suite(REPO / "experiments/quick.yaml")
    for p in expand(suite, 30):
        topo = build_topology(suite, p)
        stages = parse_placement(p.placement, topo, 30)
        if p.kind in ("edge-offload", "cloud-offload"):  # the device runs the driver, no layer
            assert len(stages) == 2 and (stages[0].node, stages[0].start, stages[0].end) == ("phone", 0, 0)
    for bad in ("phone=0:0", "phone=0:8,mec=8:8,cloud=8:30"):  # only a leading device may be empty
        with pytest.raises(SpecError, match="empty layer range"):
            parse_placement(bad, topo, 30)


def copy_trace(folder: Path, name: str = "lte") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for d in ("up", "down"):
        (folder / f"{name}.{d}").write_bytes((REPO / f"topologies/traces/ge-lte.{d}").read_bytes())
    return folder / name


def test_same_named_traces_get_distinct_ids(tmp_path):
    a, b = copy_trace(tmp_path / "a"), copy_trace(tmp_path / "b")
    suite = load_suite(make(tmp_path, params={"prompt": "capital", "cut": 4},
                            sweep={"trace": [str(a), str(b)]}))
    points = expand(suite, 30)
    split = [p for p in points if p.kind == "split"]
    assert [p.id for p in split] == ["split/trace=a/lte", "split/trace=b/lte"]
    assert [p.params["trace"] for p in split] == [str(a), str(b)]
    assert len({p.id for p in points}) == len(points) == 1 + 2 * 3  # on-device ignores the trace
    assert [p.id for p in points if p.matches("trace=b/lte")] == ["edge-offload/trace=b/lte",
                                                                  "cloud-offload/trace=b/lte",
                                                                  "split/trace=b/lte"]


def test_ids_stay_short_where_nothing_collides(tmp_path):
    a, other = copy_trace(tmp_path / "a"), copy_trace(tmp_path / "b", "nr")
    suite = load_suite(make(tmp_path, params={"prompt": "capital", "cut": 4},
                            sweep={"trace": [str(a), str(other)]}))
    assert [p.id for p in expand(suite, 30) if p.kind == "split"] == ["split/trace=lte", "split/trace=nr"]
    shipped = load_suite(REPO / "experiments/trace-replay.yaml")  # ids of results already on disk
    assert "split/trace=ge-lte" in {p.id for p in expand(shipped, 30)}


def test_value_labels_go_as_deep_as_needed():
    from testbed.experiments.points import _value_key, value_labels

    values = ["/r/x/a/lte", "/r/y/a/lte", "/r/x/b/lte", "/r/nr"]
    labels = value_labels(values)
    assert [labels[_value_key(v)] for v in values] == ["x/a/lte", "y/a/lte", "x/b/lte", "nr"]
    # values that show alike and are not paths get a short hash each
    odd = value_labels([True, "on", 10])
    assert odd[_value_key(10)] == "10"
    on = [odd[_value_key(True)], odd[_value_key("on")]]
    assert on[0] != on[1] and all(v.startswith("on~") and len(v) == len("on~") + 6 for v in on)
