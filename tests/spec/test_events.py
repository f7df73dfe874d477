"""Events and trace_start_s go through the one validator: in a topology, an ``--events`` file and a
suite point; every bad one is one line ``FILE: field: problem (got value)``."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.experiments.points import build_topology, expand, topology_data
from testbed.spec.errors import SpecError
from testbed.spec.events import combined, load_events, parse_events
from testbed.spec.suite import load_suite
from testbed.spec.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
DEC = load_topology(REPO / "topologies/device-edge-cloud.yaml")
CELL = load_topology(REPO / "topologies/cell-4.yaml")


def test_every_kind_is_read_sorted_and_in_the_topology_s_orientation() -> None:
    evs = parse_events([
        {"at_s": 20, "restart": "mec"},
        {"at_s": 5, "link": ["mec", "phone"], "up": {"bw_mbit": 1}},
        {"at_s": 8, "link": ["phone", "mec"], "down_for_s": 3},
        {"at_s": 15, "kill": "mec"},
    ], DEC, "ev.yaml")
    assert [e.kind for e in evs] == ["change", "outage", "kill", "restart"]
    assert evs[0].link == ("phone", "mec") and evs[0].down == {"bw_mbit": 1.0} and evs[0].up is None
    assert evs[1].to_dict() == {"at_s": 8.0, "kind": "outage", "link": ["phone", "mec"], "down_for_s": 3.0}
    (h,) = parse_events([{"at_s": 1, "handover": "dev1", "from": "cell1", "to": "cell1x"}],
                        _with_second_cell(), "ev.yaml")
    assert (h.node, h.src, h.dst) == ("dev1", "cell1", "cell1x")


def _with_second_cell():
    import dataclasses

    from testbed.spec.topology import LinkSpec, NodeSpec

    nodes = {**CELL.nodes, "cell1x": NodeSpec("cell1x", "cell")}
    links = [*CELL.links, LinkSpec("dev4", "cell1x"), LinkSpec("cell1x", "mec")]
    return dataclasses.replace(CELL, nodes=nodes, links=links)


@pytest.mark.parametrize(("events", "message"), [
    ("nope", "events: must be a list of events (got 'nope')"),
    ([{"at_s": 1}], "events[0]: must name a link (a change or an outage), handover, kill or restart "
                    "(got {'at_s': 1})"),
    ([{"kill": "mec"}], "events[0].at_s: missing (seconds after the workload starts)"),
    ([{"at_s": -1, "kill": "mec"}], "events[0].at_s: must be >= 0 (got -1)"),
    ([{"at_s": 1e6, "kill": "mec"}], "events[0].at_s: must be <= 86400 (one day) (got 1000000.0)"),
    ([{"at_s": 1, "kill": "mec", "x": 2}], "events[0].x: unknown key 'x' (expected one of at_s, kill)"),
    ([{"at_s": 1, "kill": "nobody"}], "events[0].kill: must be a host of device-edge-cloud.yaml "
                                      "(phone, mec, cloud) (got 'nobody')"),
    ([{"at_s": 1, "link": ["phone", "cloud"], "down_for_s": 1}],
     "events[0].link: no link between phone and cloud in device-edge-cloud.yaml (got ['phone', 'cloud'])"),
    ([{"at_s": 1, "link": "phone-mec", "down_for_s": 1}],
     "events[0].link: must be a list of two node names (got 'phone-mec')"),
    ([{"at_s": 1, "link": ["phone", "mec"], "down_for_s": 0}], "events[0].down_for_s: must be > 0 (got 0)"),
    ([{"at_s": 1, "link": ["phone", "mec"]}],
     "events[0]: a change needs up, down or both (e.g. up: {bw_mbit: 1})"),
    ([{"at_s": 1, "link": ["phone", "mec"], "up": {"bw_mbit": 0}}],
     "events[0].up.bw_mbit: must be > 0 (got 0)"),
    ([{"at_s": 1, "link": ["phone", "mec"], "up": {"trace": "x"}}],
     "events[0].up.trace: unknown key 'trace' (expected one of bw_mbit, delay_ms, jitter_ms, loss_pct, "
     "queue_pkts)"),
    ([{"at_s": 1, "link": ["phone", "mec"], "down": {"jitter_ms": 20}}],
     "events[0].down.jitter_ms: must be <= delay_ms (15) after the change (got 20)"),
    ([{"at_s": 1, "link": ["phone", "mec"], "down_for_s": 5},
      {"at_s": 3, "link": ["mec", "phone"], "down_for_s": 1}],
     "events[1].at_s: the link is still out until 6 s (got 3)"),
    ([{"at_s": 1, "handover": "mec", "from": "a", "to": "b"}],
     "events[0].handover: must be a device node (mec is a edge) (got 'mec')"),
])
def test_bad_events_are_one_line(events, message: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_events(events, DEC, "ev.yaml")
    assert str(e.value) == f"ev.yaml: {message}"


def test_handover_rules_on_a_cell_topology() -> None:
    topo = _with_second_cell()
    with pytest.raises(SpecError, match=r"events\[0\].from: must be a cell of cell-4.yaml \(cells: cell1, "
                                        r"cell1x\) \(got 'mec'\)"):
        parse_events([{"at_s": 1, "handover": "dev1", "from": "mec", "to": "cell1"}], topo, "ev.yaml")
    # the second handover must leave the cell the first one joined
    with pytest.raises(SpecError, match=r"events\[1\].from: dev1 is attached to cell1x at 2 s "
                                        r"\(got 'cell1'\)"):
        parse_events([{"at_s": 1, "handover": "dev1", "from": "cell1", "to": "cell1x"},
                      {"at_s": 2, "handover": "dev1", "from": "cell1", "to": "cell1x"}], topo, "ev.yaml")


def test_traced_links_refuse_capacity_events(tmp_path: Path) -> None:
    topo = load_topology(REPO / "topologies/trace-lte.yaml")
    lk = topo.links[0]
    with pytest.raises(SpecError, match="replays a trace, which sets its capacity"):
        parse_events([{"at_s": 1, "link": [lk.a, lk.b], "down_for_s": 1}], topo, "ev.yaml")


def test_topology_and_events_file(tmp_path: Path) -> None:
    src = (REPO / "topologies/two-node.yaml").read_text()
    topo_file = tmp_path / "t.yaml"
    topo_file.write_text(src + "events:\n  - {at_s: 2, link: [phone, mec], down_for_s: 1}\n")
    topo = load_topology(topo_file)
    assert [e.kind for e in topo.events] == ["outage"] and topo.to_dict()["events"][0]["down_for_s"] == 1.0
    topo_file.write_text(src + "events:\n  - {at_s: 2, kill: cell9}\n")
    with pytest.raises(SpecError, match=rf"^{topo_file}: events\[0\].kill: must be a host"):
        load_topology(topo_file)
    ev = tmp_path / "ev.yaml"
    ev.write_text("- {at_s: 1, kill: mec}\n")  # the list alone is an events file too
    assert load_events(ev, topo)[0].node == "mec"
    ev.write_text("events: [{at_s: 1, kill: mec}]\nevents: []\n")
    with pytest.raises(SpecError, match=rf"^{ev}: yaml: line 2, column 1: duplicate key 'events'"):
        load_events(ev, topo)
    ev.write_text("events: [{at_s: 2.5, link: [mec, phone], down_for_s: 1}]\n")
    with pytest.raises(SpecError, match=rf"^{ev}: events \(with the topology's, by time\)\[1\].at_s: "
                                        r"the link is still out until 3 s \(got 2.5\)"):
        combined(topo.events, load_events(ev, topo), topo, ev)
    ev.write_text("evnts: []\n")
    with pytest.raises(SpecError, match=rf"^{ev}: evnts: unknown key 'evnts' \(expected one of "
                                        r"description, events\)"):
        load_events(ev, topo)


def test_trace_start_s_in_a_topology(tmp_path: Path) -> None:
    trace = REPO / "topologies/traces"
    name = "ge-lte.up"
    body = "nodes: {a: {role: device}, b: {role: edge}}\nlinks:\n  - between: [a, b]\n    up: {{X}}\n"
    t = tmp_path / "t.yaml"
    t.write_text(body.replace("{X}", f"trace: {trace / name}, trace_start_s: 20"))
    assert load_topology(t).links[0].up.trace_start_s == 20.0
    t.write_text(body.replace("{X}", "bw_mbit: 5, trace_start_s: 20"))
    with pytest.raises(SpecError, match=r"links\[0\].up.trace_start_s: only meaningful with a trace "
                                        r"\(got 20\)"):
        load_topology(t)
    t.write_text(body.replace("{X}", f"trace: {trace / name}, trace_start_s: -1"))
    with pytest.raises(SpecError, match=r"links\[0\].up.trace_start_s: must be >= 0 \(got -1\)"):
        load_topology(t)


def test_the_faults_suite_points_carry_their_events() -> None:
    suite = load_suite(REPO / "experiments/faults.yaml")
    points = expand(suite, 30)
    by_id = {p.id: p for p in points}
    kinds = ("edge-offload", "cloud-offload", "split", "split-standby")
    assert set(by_id) == {"on-device"} | {f"{k}/events={e}.yaml" for k in kinds
                                          for e in ("none", "drop", "outage", "kill")}
    kill = build_topology(suite, by_id["split-standby/events=kill.yaml"]).events
    assert [(e.kind, e.node, e.at_s) for e in kill] == [("kill", "mec", 1.5), ("restart", "mec", 4.5)]
    topo = build_topology(suite, by_id["split/events=outage.yaml"])
    assert [(e.kind, e.link, e.down_for_s) for e in topo.events] == [("outage", ("phone", "mec"), 3.0)]
    assert build_topology(suite, by_id["split/events=none.yaml"]).events == []


def test_suite_parameters_trace_start_s_duration_and_inline_events(tmp_path: Path) -> None:
    s = tmp_path / "s.yaml"
    base = f"""topology: {REPO / 'topologies/trace-lte.yaml'}
workload: {{prompts: {REPO / 'experiments/prompts/short.yaml'}, max_new_tokens: 4}}
baselines: [edge-offload]
params: {{prompt: capital, trace_start_s: 20, duration_s: 30, {{X}}}}
"""
    s.write_text(base.replace("{X}", "events: [{at_s: 1, kill: mec}]"))
    suite = load_suite(s)
    (point,) = expand(suite, 30)
    data = topology_data(suite, point)
    traced = [d for lk in data["links"] for d in (lk.get("up") or {}, lk.get("down") or {}) if d.get("trace")]
    assert traced and all(d["trace_start_s"] == 20 for d in traced)
    assert point.params["duration_s"] == 30.0 and data["events"] == [{"at_s": 1, "kill": "mec"}]
    s.write_text(base.replace("{X}", "events: [{at_s: 1, kill: mecc}]"))
    with pytest.raises(SpecError, match=rf"^{s}: params.events\[0\].kill: must be a host"):
        load_suite(s)
    s.write_text(base.replace("{X}", "events: nothere.yaml"))
    with pytest.raises(SpecError, match=rf"^{s}: params.events: {tmp_path / 'nothere.yaml'}: file not found"):
        load_suite(s)
    s.write_text(base.replace("{X}", "events: []").replace("duration_s: 30", "duration_s: 0"))
    with pytest.raises(SpecError, match=rf"^{s}: params.duration_s: must be > 0 \(got 0\)"):
        load_suite(s)
