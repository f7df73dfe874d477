"""Kill and restart events against a stage with a standby: the scheduled SIGKILL ends in a recovery tied
to its event record, the tokens are the fault-free ones, and the restart starts the killed shard again
(over loopback: real programs, no namespaces)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.apps.inference.local_chain import free_port
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import run_on_network
from testbed.model.generate import generate_split
from testbed.model.shard import Shard
from testbed.spec.events import parse_events
from testbed.spec.topology import load_topology

REPO = Path(__file__).resolve().parents[3]
TOPO = REPO / "topologies" / "device-edge-cloud.yaml"
PROMPT = [3, 1, 4, 1, 5]
N = 120  # a second or two of generation over loopback: both events fall inside
# no deadline fires on a loaded machine: the kill is noticed by its dropped connection
LOADED_FLOOR_MS = 2000.0


@pytest.mark.slow
def test_kill_event_ends_in_a_recovery_and_restart_starts_the_node(tiny2: Path, loopback_net,
                                                                   tmp_path: Path) -> None:
    topo = load_topology(TOPO)
    net = loopback_net(topo)
    stages = [Stage("phone", 0, 1), Stage("mec", 1, 2, ("cloud",))]
    events = parse_events([{"at_s": 0.3, "kill": "mec"}, {"at_s": 0.6, "restart": "mec"}], topo, "ev.yaml")
    res = run_on_network(net, stages, tiny2, "", N, "none", "fp32", True, prompt_ids=PROMPT,
                         ports=[0, free_port()], standby_ports=[[], [free_port()]],
                         logs=tmp_path, events=events, detect_floor_ms=LOADED_FLOOR_MS)
    ref = generate_split([Shard.load(tiny2, s.start, s.end) for s in stages], PROMPT, N, kv_cache=True,
                         codec="fp32")
    assert res["tokens"] == [int(t) for t in ref.tokens]
    kill, restart = res["events"]
    assert kill["kind"] == "kill" and "error" not in kill and "SIGKILL to shard-mec" in kill["detail"]
    assert 0.3 <= kill["started_s"] <= kill["actual_s"] < 1.3
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
