"""run_on_network on loopback: results, errors, a node dying mid-run, logs, nothing left behind."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from testbed.apps.inference.local_chain import free_port
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import InferenceError, run_on_network
from testbed.apps.launch import ProgramFailed
from testbed.model.generate import generate_split
from testbed.model.shard import Shard
from testbed.spec.topology import load_topology

TOPO = Path(__file__).resolve().parents[3] / "topologies" / "device-edge-cloud.yaml"
STAGES = [Stage("phone", 0, 1), Stage("mec", 1, 2)]


@pytest.mark.slow
def test_run_on_loopback_matches_reference(tiny2: Path, loopback_net, tmp_path: Path) -> None:
    net = loopback_net(load_topology(TOPO))
    ids = [3, 1, 4, 1, 5]
    res = run_on_network(net, STAGES, tiny2, "", 6, "none", "bf16", True, prompt_ids=ids,
                         ports=[0, free_port()], logs=tmp_path)
    shards = [Shard.load(tiny2, s.start, s.end) for s in STAGES]
    assert res["tokens"] == generate_split(shards, ids, len(res["tokens"]), codec="bf16").tokens
    assert net.all_stopped()
    # every program measured (CPU from its ready line to its stop) and logged, whole, in the run's folder
    # (a tiny stage may use less than one clock tick between the two readings: 0 is a measurement)
    assert all(h["cpu_ms"] is not None and h["cpu_ms"] >= 0 and h["threads"] >= 1 for h in res["per_hop"])
    assert res["logs"] == str(tmp_path)
    assert "READY" in (tmp_path / "shard-mec.log").read_text()
    assert f'"tokens": {json.dumps(res["tokens"])}' in (tmp_path / "driver-phone.log").read_text()


@pytest.mark.slow
def test_a_driver_error_names_its_log(tiny2: Path, loopback_net, tmp_path: Path) -> None:
    """The shard refuses a token id past the vocabulary: the driver's error says so, with its log."""
    net = loopback_net(load_topology(TOPO))
    stages = [Stage("phone", 0, 0), Stage("mec", 0, 2)]  # no layer on the device: ids go to mec
    why = r"split inference from phone failed: .*token id out of range"
    with pytest.raises(InferenceError, match=why) as e:
        run_on_network(net, stages, tiny2, "", 3, "none", "fp32", True, prompt_ids=[1, 10**6],
                       ports=[0, free_port()], logs=tmp_path)
    assert f"(log: {tmp_path / 'driver-phone.log'})" in str(e.value)
    assert "token id out of range" in (tmp_path / "driver-phone.log").read_text()


@pytest.mark.slow
def test_node_death_is_reported_at_once(tiny2: Path, loopback_net, tmp_path: Path) -> None:
    net = loopback_net(load_topology(TOPO))
    killed: list[float] = []

    def kill_edge() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(net.procs.get("phone", [])) == 0:
            time.sleep(0.1)  # the driver starts once the edge node is ready
        time.sleep(1.0)
        net.procs["mec"][0].kill()
        killed.append(time.monotonic())

    killer = threading.Thread(target=kill_edge)
    killer.start()
    with pytest.raises(ProgramFailed, match=r"shard-mec on mec exited with code -9 during the run") as e:
        run_on_network(net, STAGES, tiny2, "", 900, "none", "fp32", False, prompt_ids=[5, 6, 7],
                       ports=[0, free_port()], logs=tmp_path)
    killer.join()
    assert killed and time.monotonic() - killed[0] < 30  # noticed while the driver still runs
    assert e.value.log == tmp_path / "shard-mec.log" and "READY" in e.value.log.read_text()
    assert net.all_stopped()
