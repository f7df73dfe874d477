"""``testbed infer --adapter``: every program merges the LoRA of its own layers (peft's format)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed.apps.inference.local_chain import free_port
from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import run_on_network
from testbed.apps.training.local import SHIPPED_TEXT, train_batches
from testbed.apps.training.lora import LoraSpec, save_adapters
from testbed.model.generate import generate_split, load_shards
from testbed.spec.topology import load_topology
from tests.apps.training.threads import split_run
from tests.model.lora_adapters import merged_greedy, save_peft_adapter

REPO = Path(__file__).resolve().parents[3]
TOPO = REPO / "topologies" / "device-edge-cloud.yaml"
PROMPT = [5, 17, 33, 2, 9, 41]


@pytest.fixture(scope="module")
def adapter(tiny2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_peft_adapter(tiny2, tmp_path_factory.mktemp("lora") / "a")


@pytest.mark.slow
def test_split_with_adapter_equals_the_merged_model(tiny2: Path, adapter: Path, loopback_net,
                                                     tmp_path: Path) -> None:
    """Driver (layer 0) and a shard node (layer 1 and the head), both adapted, fp32 on the wire."""
    net = loopback_net(load_topology(TOPO))
    stages = [Stage("phone", 0, 1), Stage("mec", 1, 2)]
    res = run_on_network(net, stages, tiny2, "", 8, "none", "fp32", True, prompt_ids=PROMPT,
                         ports=[0, free_port()], logs=tmp_path, adapter=adapter)
    n = len(res["tokens"])
    assert res["tokens"] == merged_greedy(tiny2, adapter, PROMPT, n)
    assert res["tokens"] != merged_greedy(tiny2, None, PROMPT, n), "the adapter changes nothing: a weak test"
    assert res["adapter"] == str(adapter.resolve())
    assert "merged=[1]" in (tmp_path / "shard-mec.log").read_text()  # the node merged its own layer


def test_adapters_trained_by_testbed_train_serve_split(tiny2: Path, tmp_path: Path) -> None:
    """Two steps of the real split training (layer 0 frozen: only layer 1 has adapters), saved as
    ``testbed train`` saves them, then served by the shards of another cut."""
    batches = train_batches(tiny2, [str(SHIPPED_TEXT)], steps=2, batch=2, seq=8, seed=0)
    _, adapters = split_run(tiny2, [1], 2, batches, lr=5e-2, seed=3, trainable=[1])
    assert {n.split(".")[2] for n in adapters} == {"1"}
    out = save_adapters(tmp_path / "adapters", adapters, LoraSpec(), str(tiny2))
    got = generate_split(load_shards(tiny2, [1], adapter=out), PROMPT, 8).tokens
    assert got == merged_greedy(tiny2, out, PROMPT, len(got))


def test_infer_refuses_an_adapter_of_another_base(tiny2: Path, tmp_path: Path) -> None:
    """Checked before the network comes up: one line, exit 2."""
    r = subprocess.run([sys.executable, "-m", "testbed", "infer", str(TOPO), "--placement", "phone=0:2",
                        "--prompt", "hi", "--model", str(tiny2), "--adapter", str(tmp_path / "none"),
                        "--logs", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("--adapter: adapter: must be a peft adapter folder (no such folder) "
                                f"(got {str(tmp_path / 'none')!r})")


def test_node_settings_name_a_missing_adapter(tiny2: Path, adapter: Path, tmp_path: Path) -> None:
    from testbed.apps.inference.settings import DriverSettings, ShardSettings

    good = ShardSettings(bind="tcp://127.0.0.1:5601", model=str(tiny2), start=1, end=2, adapter=str(adapter))
    assert list(good.problems()) == []
    bad = DriverSettings(model=str(tiny2), start=0, end=2, adapter=str(tmp_path))
    assert list(bad.problems()) == [("adapter", "must be a peft adapter folder (no adapter_config.json, "
                                                "adapter_model.safetensors)")]
