"""run_on_network's process handling, on loopback: results, a node dying mid-run, nothing left behind."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from testbed.apps.inference.local_chain import free_port
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import InferenceError, run_on_network
from testbed.model.generate import generate_split
from testbed.model.shard import Shard
from testbed.model.tiny import make_tiny_model_dir

STAGES = [Stage("dev", 0, 1), Stage("edge", 1, 2)]


class LoopbackNet:
    """The two methods run_on_network needs from EmulatedNetwork, on the host's loopback."""

    def __init__(self) -> None:
        self.procs: dict[str, list[subprocess.Popen]] = {}

    def ip(self, node: str, peer: str | None = None) -> str:
        return "127.0.0.1"

    def popen(self, node: str, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, **kw)
        self.procs.setdefault(node, []).append(p)
        return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", n_layers=2, hidden=64)


@pytest.mark.slow
def test_run_on_loopback_matches_reference(tiny: Path) -> None:
    net = LoopbackNet()
    ids = [3, 1, 4, 1, 5]
    res = run_on_network(net, STAGES, tiny, "", 6, "none", "bf16", True, prompt_ids=ids,
                         ports=[0, free_port()])
    shards = [Shard.load(tiny, s.start, s.end) for s in STAGES]
    assert res["tokens"] == generate_split(shards, ids, len(res["tokens"]), codec="bf16").tokens
    assert all(p.poll() is not None for ps in net.procs.values() for p in ps)


@pytest.mark.slow
def test_node_death_is_reported_quickly_and_everything_stops(tiny: Path) -> None:
    net = LoopbackNet()

    def kill_edge() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(net.procs.get("dev", [])) == 0:
            time.sleep(0.1)  # the driver starts once the edge node is ready
        time.sleep(1.0)
        net.procs["edge"][0].kill()

    killer = threading.Thread(target=kill_edge)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(InferenceError, match="shard node on edge exited"):
        run_on_network(net, STAGES, tiny, "", 900, "none", "fp32", False, prompt_ids=[5, 6, 7],
                       ports=[0, free_port()])
    killer.join()
    assert time.monotonic() - t0 < 90
    assert all(p.poll() is not None for ps in net.procs.values() for p in ps)
