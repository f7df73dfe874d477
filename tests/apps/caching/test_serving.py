"""Multi-tenant LoRA serving on the tiny model: a mixed batch (different adapters, the base, prompts
of different lengths) gives each request exactly the tokens of its merged model, on both backends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from testbed.apps.caching.serving import (
    BASE,
    AdapterServer,
    Request,
    greedy,
    load_base,
    lora_config,
    merged_model,
    random_adapter_state,
)
from testbed.model.tiny import make_tiny_model_dir

TOKENS = 10
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 21], [30, 31, 32, 33]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), n_layers=2)


def adapters(shapes) -> dict[str, tuple]:
    """Three generated adapters: different ranks, alphas and target modules, all non-zero."""
    out = {}
    for k, (rank, targets) in enumerate([(4, ("q_proj", "v_proj")), (8, ("q_proj", "k_proj", "o_proj")),
                                         (2, ("v_proj", "down_proj", "up_proj"))]):
        cfg = lora_config(rank, alpha=3 * rank + k, targets=targets)
        out[f"a{k}"] = (cfg, random_adapter_state(shapes, cfg, seed=10 + k, std=0.3))
    return out


@pytest.mark.parametrize("backend", ["stacked", "peft"])
def test_mixed_batch_equals_each_merged_model(tiny: Path, backend: str):
    torch.manual_seed(0)
    server = AdapterServer(load_base(tiny), backend)
    ads = adapters(server.shapes)
    for name, (cfg, state) in ads.items():
        server.add_adapter(name, cfg, state)
    names = ["a0", "a1", "a2", BASE, "a1"]
    reqs = [Request(n, p) for n, p in zip(names, PROMPTS, strict=True)]
    res = server.generate(reqs, TOKENS)
    assert res.distinct_adapters == 4 and res.new_tokens == len(reqs) * TOKENS
    refs = []
    for r in reqs:
        base = load_base(tiny)
        model = base if r.adapter == BASE else merged_model(base, *ads[r.adapter])
        refs.append(greedy(model, r.prompt_ids, TOKENS))
    assert res.tokens == refs
    # the adapters matter: each changes the tokens of the same prompt
    same_prompt = server.generate([Request(n, PROMPTS[0]) for n in [BASE, "a0", "a1", "a2"]], TOKENS).tokens
    assert len({tuple(t) for t in same_prompt}) == 4
    # a batch on one adapter takes the single-adapter path and agrees with the mixed batch
    assert server.generate([Request("a1", PROMPTS[1]), Request("a1", PROMPTS[4])], TOKENS).tokens == \
        [res.tokens[1], res.tokens[4]]
    mem = server.memory()
    assert mem["adapters"] == 3 and mem["total_bytes"] == mem["base_bytes"] + mem["adapter_bytes"]
    assert mem["adapter_bytes"] == sum(t.numel() * 4 for _, st in ads.values() for t in st.values())


def test_adapters_come_and_go_on_the_stacked_backend(tiny: Path):
    server = AdapterServer(load_base(tiny))
    ads = adapters(server.shapes)
    for name, (cfg, state) in ads.items():
        server.add_adapter(name, cfg, state)
    before = server.generate([Request("a2", PROMPTS[2]), Request("a0", PROMPTS[0])], TOKENS).tokens
    server.remove_adapter("a1")
    assert server.adapters == ["a0", "a2"]
    assert server.generate([Request("a2", PROMPTS[2]), Request("a0", PROMPTS[0])], TOKENS).tokens == before
    with pytest.raises(KeyError, match="a1"):
        server.generate([Request("a1", PROMPTS[0])], 1)
    with pytest.raises(ValueError, match="taken"):
        server.add_adapter("a0", *ads["a0"])
    cfg, state = ads["a1"]
    broken = {k: v for k, v in state.items() if "lora_B" not in k or "layers.0.self_attn.q_proj" not in k}
    with pytest.raises(ValueError, match="lora_A and lora_B"):
        server.add_adapter("b", cfg, broken)


def test_serve_bench_json(tiny: Path, capsys):
    from testbed.cli import main

    assert main(["serve-bench", "--adapters", "3", "--batch", "4", "--tokens", "3", "--repeats", "1",
                 "--model", str(tiny), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["distinct_adapters"] for r in out["rows"]] == [1, 2, 3]
    assert all(r["tokens_per_s"] > 0 for r in out["rows"])
    mem = out["memory"]
    assert mem["adapters"] == 3 and mem["total_bytes"] == mem["base_bytes"] + mem["adapter_bytes"] > 0
    assert out["generated_adapters"] is True
    assert main(["serve-bench", "--batch", "0"]) == 2
    assert "serve-bench: --batch: must be an integer >= 1 (got 0)" in capsys.readouterr().err
