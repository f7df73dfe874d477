"""A stage that dies mid-generation: the client takes over with its standby and the tokens stay the same.

Real programs (SIGKILLed over loopback and across an emulated network) and, for the paths that need
no process start-up, shard servers in threads of this process whose sockets are closed under them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from testbed.apps.inference.local_chain import free_port
from testbed.apps.inference.placement import Stage, parse_placement
from testbed.apps.inference.run import run_on_network, run_split_inference
from testbed.apps.inference.split_client import SplitClient, SplitError
from testbed.apps.launch import Running, cpu_ms
from testbed.model.generate import generate_split
from testbed.model.shard import Shard
from testbed.model.tiny import make_tiny_model_dir
from testbed.spec.errors import SpecError
from testbed.spec.topology import load_topology
from tests.apps.inference.threaded_node import Node

REPO = Path(__file__).resolve().parents[3]
TOPO = REPO / "topologies" / "device-edge-cloud.yaml"
CHAIN = REPO / "topologies" / "chain-4hop.yaml"  # phone - edge1 - edge2 - edge3 - cloud
PROMPT = [3, 1, 4, 1, 5]  # the tiny model's greedy text reaches its EOS only after 127 tokens
# a step deadline no scheduling stall of a loaded test machine reaches: the kills below are noticed by
# the dropped connections, at once, and a false alarm would show as an extra recovery
LOADED_FLOOR_MS = 2000.0
N = 120  # a few seconds of generation over loopback on a loaded machine: the kills fall inside


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", n_layers=3, hidden=64)


def reference(model: Path, stages: list[Stage], n: int) -> list[int]:
    shards = [Shard.load(model, s.start, s.end) for s in stages]
    return [int(t) for t in generate_split(shards, list(PROMPT), n, kv_cache=True, codec="fp32").tokens]


def killer(victims: list[tuple[str, float | str]], out: list[float]):
    """SIGKILL each victim in turn once the driver is ready (generating).

    A victim's trigger is a delay after the driver's ready line, or the name of a standby: then it
    dies once that standby has computed (its CPU time rose since the previous kill), so the kill
    falls after the first take-over, whatever the pace of the machine: a fixed delay missed the
    end of a fast run."""
    def on_ready(progs: dict[str, Running]) -> None:
        def kill() -> None:
            deadline = time.monotonic() + 120
            while progs["phone"].ready_at is None and time.monotonic() < deadline:
                time.sleep(0.01)
            t0 = time.monotonic()
            for victim, trigger in victims:
                if isinstance(trigger, str):
                    base = cpu_ms(progs[trigger].popen.pid) or 0.0
                    while (cpu_ms(progs[trigger].popen.pid) or 0.0) <= base and time.monotonic() < deadline:
                        time.sleep(0.001)
                else:
                    time.sleep(max(0.0, t0 + trigger - time.monotonic()))
                progs[victim].popen.kill()
                out.append(time.monotonic())
        threading.Thread(target=kill, daemon=True).start()
    return on_ready


def test_standby_syntax_and_errors() -> None:
    topo = load_topology(TOPO)
    got = parse_placement("phone=0:1,mec|cloud=1:3", topo, 3)
    assert got[1] == Stage("mec", 1, 3, ("cloud",)) and str(got[1]) == "mec|cloud=1:3"
    for text, why in [("phone|mec=0:1,cloud=1:3", "cannot have a standby"),
                      ("phone=0:1,mec|=1:3", "standby name is empty"),
                      ("phone=0:1,mec|mec=1:3", "placed twice"),
                      ("phone=0:1,mec|cloud=1:2,cloud=2:3", "placed twice"),
                      ("phone=0:1,mec|moon=1:3", "no such node")]:
        with pytest.raises(SpecError) as e:
            parse_placement(text, topo, 3)
        assert str(e.value).startswith("--placement: ") and why in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_two_stages_killed_over_loopback(tiny3: Path, loopback_net, tmp_path: Path) -> None:
    """phone=0:1, edge1|edge2=1:2, cloud|edge3=2:3: the driver's next hop dies, then the stage
    behind it, as soon as the standby that took over computes (during its rebuild or after it, as
    the machine's pace has it; both end the same): two recoveries, the reference tokens."""
    net = loopback_net(load_topology(CHAIN))
    stages = [Stage("phone", 0, 1), Stage("edge1", 1, 2, ("edge2",)), Stage("cloud", 2, 3, ("edge3",))]
    killed: list[float] = []
    res = run_on_network(net, stages, tiny3, "", N, "none", "fp32", True, prompt_ids=PROMPT,
                         ports=[0, free_port(), free_port()],
                         standby_ports=[[], [free_port()], [free_port()]],
                         logs=tmp_path, on_ready=killer([("edge1", 0.05), ("cloud", "edge2")], killed),
                         detect_floor_ms=LOADED_FLOOR_MS)
    assert len(killed) == 2, "the kills did not happen"
    assert len(res["tokens"]) == N and len(res["token_ms"]) == N
    assert res["tokens"] == reference(tiny3, stages, N)
    assert [(r["stage"], r["failed_node"], r["standby"]) for r in res["recoveries"]] == [
        (1, "edge1", "edge2"), (2, "cloud", "edge3")]
    for rec, t_kill in zip(res["recoveries"], killed, strict=True):
        assert 0 <= rec["detect_ms"] < 30_000 and rec["rebuild_ms"] > 0
        assert rec["detected_at_s"] >= t_kill - 0.05  # noticed after the kill, not before
    assert sorted(e["node"] for e in res["node_exits"]) == ["cloud", "edge1"]
    assert net.all_stopped()


@pytest.mark.root
@pytest.mark.slow
def test_standby_takes_over_across_the_emulated_network(tiny3: Path, tmp_path: Path) -> None:
    killed: list[float] = []
    res = run_split_inference(load_topology(CHAIN), "phone=0:1,edge1|edge2=1:2,cloud=2:3", "",
                              max_new_tokens=60, model=tiny3, prompt_ids=PROMPT, logs=tmp_path,
                              on_ready=killer([("edge1", 0.5)], killed), detect_floor_ms=LOADED_FLOOR_MS)
    assert killed and len(res["tokens"]) == 60
    stages = parse_placement("phone=0:1,edge1|edge2=1:2,cloud=2:3")
    assert res["tokens"] == reference(tiny3, stages, 60)
    (rec,) = res["recoveries"]
    assert (rec["stage"], rec["failed_node"], rec["standby"]) == (1, "edge1", "edge2")
    assert res["placement"] == "phone=0:1,edge1|edge2=1:2,cloud=2:3"


# ---- in-process chains: shard servers in threads --------------------------------------------------

def test_no_standby_left_ends_with_a_clear_error_and_the_record(tiny3: Path) -> None:
    shards = [Shard.load(tiny3, s, s + 1) for s in range(3)]
    last = Node(shards[2], None)
    mid = Node(shards[1], last.addr)
    client = SplitClient(shards[0], mid.addr, layers=["0:1", "1:2", "2:3"], timeout_s=30,
                         routes=[["phone"], ["mec"], ["cloud"]])
    try:
        client.connect()
        threading.Timer(0.3, last.die).start()
        why = r"stage 2 \(cloud, layers 2:3\) stopped answering .* no standby"
        with pytest.raises(SplitError, match=why):
            client.generate(torch.tensor([PROMPT]), 1000, set())
        assert client.partial["tokens"] and len(client.partial["token_ms"]) == len(client.partial["tokens"])
    finally:
        client.close()
        mid.die()


def test_a_hung_stage_is_found_by_its_deadline(tiny3: Path) -> None:
    """A stage that stops answering without dropping its connection (a frozen program): the step's
    deadline passes, probes find the stage, its standby takes over; tokens as without the fault."""
    shards = [Shard.load(tiny3, s, s + 1) for s in range(3)]
    last = Node(shards[2], None)
    standby = Node(shards[1], last.addr)
    mid = Node(shards[1], last.addr)
    client = SplitClient(shards[0], mid.addr, layers=["0:1", "1:2", "2:3"], timeout_s=30,
                         next_standbys=[standby.addr], routes=[["phone"], ["mec", "mec2"], ["cloud"]])
    stages = [Stage("phone", 0, 1), Stage("mec", 1, 2), Stage("cloud", 2, 3)]
    try:
        client.connect()
        threading.Timer(0.3, mid.freeze).start()
        got = client.generate(torch.tensor([PROMPT]), N, set())
        assert mid.frozen
        assert got["tokens"] == reference(tiny3, stages, N)
        (rec,) = got["recoveries"]
        assert rec["why"] == "no reply in time" and (rec["failed_node"], rec["standby"]) == ("mec", "mec2")
        assert rec["found_by"] == "early probe"  # asked before the deadline, not probed after it
    finally:
        client.close()
        for n in (standby, last):
            n.die()
        mid.server.close()


def test_early_probe_passes_over_live_stages_to_the_frozen_one(tiny3: Path) -> None:
    """The last stage freezes: at the deadline the early probe has the middle stage's answer and
    not the last one's, so the last stage (not the next hop) is replaced; tokens as without it."""
    shards = [Shard.load(tiny3, s, s + 1) for s in range(3)]
    last, standby = Node(shards[2], None), Node(shards[2], None)
    mid = Node(shards[1], last.addr, next_standbys=[standby.addr])
    client = SplitClient(shards[0], mid.addr, layers=["0:1", "1:2", "2:3"], timeout_s=30,
                         routes=[["phone"], ["mec"], ["cloud", "cloud2"]])
    stages = [Stage("phone", 0, 1), Stage("mec", 1, 2), Stage("cloud", 2, 3)]
    try:
        client.connect()
        threading.Timer(0.3, last.freeze).start()
        got = client.generate(torch.tensor([PROMPT]), N, set())
        assert last.frozen
        assert got["tokens"] == reference(tiny3, stages, N)
        (rec,) = got["recoveries"]
        assert (rec["stage"], rec["failed_node"], rec["standby"]) == (2, "cloud", "cloud2")
        assert rec["found_by"] == "early probe" and got["stalls"] == 0
    finally:
        client.close()
        for n in (standby, mid):
            n.die()
        last.server.close()
