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
