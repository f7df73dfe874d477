"""Split inference with every node a container: same tokens as the process runtime (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.hosts import docker_engine as de

pytestmark = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
TOPO = REPO / "topologies" / "device-edge-cloud.yaml"
PROMPT = [5, 17, 33, 2, 9, 41]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from testbed.model.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", n_layers=3, hidden=64)


def _containers(client) -> set[str]:
    return {c.id for c in client.containers.list(all=True, filters={"label": de.LABEL})}


def test_infer_tokens_identical_on_docker_and_process(client, tiny: Path) -> None:
    from testbed.apps.inference.run import run_split_inference
    from testbed.spec.topology import load_topology

    topo = load_topology(TOPO)
    before = _containers(client)
    runs = {}
    for runtime in ("docker", "process"):
        runs[runtime] = run_split_inference(topo, "phone=0:1,mec=1:2,cloud=2:3", "", max_new_tokens=8,
                                            codec="fp32", model=tiny, prompt_ids=PROMPT, runtime=runtime)
    assert len(runs["docker"]["tokens"]) == 8
    assert runs["docker"]["tokens"] == runs["process"]["tokens"]
    assert [h["node"] for h in runs["docker"]["per_hop"]] == ["phone", "mec", "cloud"]
    # the shaped links still apply inside containers: >= one 30 ms phone-mec round trip per step
    assert runs["docker"]["per_hop"][1]["transfer_ms"] >= 8 * 30 * 0.9
    assert _containers(client) <= before, "containers left behind"


def test_handover_signal_reaches_a_driver_in_its_container(client, tiny2: Path, tmp_path: Path) -> None:
    """Events on container nodes: the run signals the device's driver (a program inside the phone's
    container, seen from the host by its PID) once the network moved it; the session moves to cellB's
    edge container and the tokens are the fault-free ones."""
    from testbed.apps.inference.run import run_split_inference
    from testbed.model.generate import generate_split
    from testbed.model.shard import Shard
    from testbed.spec.topology import load_topology
    from tests.apps.inference.test_handover import TWO_CELLS

    src = tmp_path / "two-cells.yaml"
    src.write_text(TWO_CELLS)
    before = _containers(client)
    n = 100
    res = run_split_inference(load_topology(src), "phone=0:1,mecA|mecB=1:2", "", max_new_tokens=n,
                              model=tiny2, prompt_ids=PROMPT, shaper="userspace", runtime="docker",
                              logs=tmp_path / "logs", detect_floor_ms=2000.0)
    ref = generate_split([Shard.load(tiny2, 0, 1), Shard.load(tiny2, 1, 2)], PROMPT, n)
    assert res["tokens"] == ref.tokens
    (ev,) = res["events"]
    assert "error" not in ev and "stage 1 moves to mecB" in ev["detail"], ev
    (h,) = res["handovers"]
    assert (h["from_node"], h["to_node"]) == ("mecA", "mecB") and h["rebuild_ms"] > 0
    assert res["recoveries"] == []
    assert _containers(client) <= before, "containers left behind"
