"""Kill and restart events against a stage with a standby: the scheduled SIGKILL ends in a recovery tied
to its event record, the tokens are the fault-free ones, and the restart starts the killed shard again
(over loopback: real programs, no namespaces); suites take standbys in their placements."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.apps.inference.local_chain import free_port
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import run_on_network, tie_to_events
from testbed.experiments.points import build_topology, expand
from testbed.experiments.runner import chains_for
from testbed.model.generate import generate_split
from testbed.model.shard import Shard
from testbed.spec.errors import SpecError
from testbed.spec.events import parse_events
from testbed.spec.suite import load_suite
from testbed.spec.topology import load_topology

REPO = Path(__file__).resolve().parents[3]
TOPO = REPO / "topologies" / "device-edge-cloud.yaml"
PROMPT = [3, 1, 4, 1, 5]
N = 600  # tiny2 reaches no EOS before 700 tokens; 120 ended before a kill at 0.3 s on a fast host
# no deadline fires on a loaded machine: the kill is noticed by its dropped connection
LOADED_FLOOR_MS = 2000.0


@pytest.mark.slow
def test_kill_event_ends_in_a_recovery_and_restart_starts_the_node(tiny2: Path, loopback_net,
                                                                   tmp_path: Path) -> None:
    topo = load_topology(TOPO)
    net = loopback_net(topo)
    stages = [Stage("phone", 0, 1), Stage("mec", 1, 2, ("cloud",))]
    events = parse_events([{"at_s": 0.1, "kill": "mec"}, {"at_s": 0.3, "restart": "mec"}], topo, "ev.yaml")
    res = run_on_network(net, stages, tiny2, "", N, "none", "fp32", True, prompt_ids=PROMPT,
                         ports=[0, free_port()], standby_ports=[[], [free_port()]],
                         logs=tmp_path, events=events, detect_floor_ms=LOADED_FLOOR_MS)
    ref = generate_split([Shard.load(tiny2, s.start, s.end) for s in stages], PROMPT, N, kv_cache=True,
                         codec="fp32")
    assert res["tokens"] == [int(t) for t in ref.tokens]
    kill, restart = res["events"]
    assert kill["kind"] == "kill" and "error" not in kill and "SIGKILL to shard-mec" in kill["detail"]
    assert 0.1 <= kill["started_s"] <= kill["actual_s"] < 1.1
    (rec,) = res["recoveries"]
    assert (rec["stage"], rec["failed_node"], rec["standby"]) == (1, "mec", "cloud")
    assert rec["event"] == 0 and kill["recovered_by"] == "cloud (stage 1)"
    # noticed after the SIGKILL (the dropped connection), well before any deadline
    assert 0 <= rec["after_kill_ms"] < LOADED_FLOOR_MS and rec["detected_s"] >= kill["started_s"]
    assert restart["kind"] == "restart" and "error" not in restart, restart
    assert restart["detail"] == "started shard-mec.restart1"
    assert [e["node"] for e in res["node_exits"]] == ["mec"]
    assert (tmp_path / "shard-mec.restart1.log").exists()
    assert net.all_stopped()


def test_recoveries_and_handovers_are_tied_to_their_events() -> None:
    records = [{"kind": "kill", "kill": "mec", "at_s": 1.0, "started_s": 1.01, "actual_s": 1.02},
               {"kind": "handover", "handover": "phone", "from": "cellA", "to": "cellB", "at_s": 2.0,
                "started_s": 2.0, "actual_s": 2.05},
               {"kind": "kill", "kill": "mec", "at_s": 9.0, "started_s": 9.0, "actual_s": 9.0}]
    t0 = 100.0
    result = {"gen_start_s": 0.5, "token_ms": [500.0, 1020.0, 80.0, 100.0],  # steps end 1, 2.02, 2.1, 2.2
              "recoveries": [{"stage": 1, "failed_node": "mec", "standby": "cloud", "detected_at_s": 101.05}],
              "handovers": [{"noticed_at_s": 102.06, "rebuild_ms": 40.0}]}
    tie_to_events(result, records, t0)
    (rec,) = result["recoveries"]
    assert rec["event"] == 0 and rec["detected_s"] == 1.05 and rec["after_kill_ms"] == pytest.approx(40.0)
    assert records[0]["recovered_by"] == "cloud (stage 1)" and "recovered_by" not in records[2]
    (h,) = result["handovers"]
    assert (h["event"], h["from"], h["to"], h["at_s"]) == (1, "cellA", "cellB", 2.0)
    assert h["move_ms"] == pytest.approx(50.0) and h["notice_ms"] == pytest.approx(60.0)
    assert h["tokens_affected"] == 2  # the steps pending between 2.0 and 2.1 s: the second and the third


def test_suites_take_standbys() -> None:
    suite = load_suite(REPO / "experiments" / "faults.yaml")
    point = next(p for p in expand(suite, 30) if p.placement_name == "split-standby"
                 and "kill" in str(p.params["events"]))
    assert point.placement == "phone=0:4,mec|cloud=4:30"
    topo = build_topology(suite, point)
    assert [e.kind for e in topo.events] == ["kill", "restart"]
    assert chains_for(suite, point, topo, 30) == [[Stage("phone", 0, 4), Stage("mec", 4, 30, ("cloud",))]]
    with pytest.raises(SpecError, match="placements.bad: no node 'moon' in the topology"):
        load_suite(REPO / "experiments" / "faults.yaml", ["placements.bad=phone=0:{cut},mec|moon={cut}:30"])
