"""The real SmolLM2 split across device, edge and cloud: coherent text, same tokens as in one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.apps.inference.run import run_split_inference
from testbed.model.generate import generate_split, load_shards
from testbed.model.loading import default_model_dir, eos_ids, format_prompt, load_tokenizer
from testbed.spec.topology import load_topology

TOPO = Path(__file__).resolve().parents[3] / "topologies" / "device-edge-cloud.yaml"


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.model
def test_smollm2_across_device_edge_cloud() -> None:
    prompt = "What is the capital of France?"
    res = run_split_inference(load_topology(TOPO), "phone=0:8,mec=8:20,cloud=20:30", prompt,
                              max_new_tokens=16, codec="fp16")
    assert "Paris" in res["text"], res["text"]
    model = default_model_dir()
    tok = load_tokenizer(model)
    shards = load_shards(model, [8, 20])
    ref = generate_split(shards, format_prompt(tok, prompt), 16, codec="fp16",
                         eos_ids=eos_ids(tok, shards[0].config))
    assert res["tokens"] == ref.tokens
    assert [h["node"] for h in res["per_hop"]] == ["phone", "mec", "cloud"]
    assert res["per_hop"][1]["payload_up"] == (res["prompt_tokens"] + len(res["tokens"]) - 1) * 2 * 576
    assert res["ttft_ms"] > 30 and res["tpot_ms"] > 80  # at least the round trips phone-mec-cloud
