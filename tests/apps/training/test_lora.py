"""Adapters: the same start on every stage, saved in peft's format, loadable by peft on the base model."""

from __future__ import annotations

from pathlib import Path

import torch

from testbed.apps.training.local import SHIPPED_TEXT, train_batches
from testbed.apps.training.lora import LoraSpec, adapter_layout, save_adapters
from testbed.apps.training.stage import TrainStage
from tests.apps.training.threads import split_run


def test_initial_adapters_do_not_depend_on_the_cut(tiny4: Path) -> None:
    whole = dict(TrainStage(tiny4, 0, 4, LoraSpec(rank=4), seed=7).named_adapters)
    parts = {**dict(TrainStage(tiny4, 0, 1, LoraSpec(rank=4), seed=7).named_adapters),
             **dict(TrainStage(tiny4, 1, 4, LoraSpec(rank=4), seed=7).named_adapters)}
    assert sorted(whole) == sorted(parts)
    for name, p in whole.items():
        assert torch.equal(p, parts[name])
    other = dict(TrainStage(tiny4, 0, 4, LoraSpec(rank=4), seed=8).named_adapters)
    a = "model.layers.2.self_attn.q_proj.lora_A.weight"
    assert not torch.equal(other[a], whole[a])
    assert not any(p.requires_grad for n, p in TrainStage(tiny4, 0, 1, LoraSpec(), 0).shard.named_parameters()
                   if "lora_" not in n)


def test_layout_without_weights_matches_and_freezing_skips_layers(tiny4: Path) -> None:
    st = TrainStage(tiny4, 1, 4, LoraSpec(rank=4, targets=("q_proj", "down_proj")), 0, trainable={1, 3})
    layout = adapter_layout(st.shard.config, 1, 4, LoraSpec(rank=4, targets=("q_proj", "down_proj")), {1, 3})
    assert layout == [(n, tuple(p.shape)) for n, p in st.named_adapters]
    assert {n.split(".")[2] for n, _ in layout} == {"1", "3"}


def test_saved_adapters_load_in_peft_and_give_the_same_logits(tiny4: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    spec = LoraSpec()
    batches = train_batches(tiny4, [str(SHIPPED_TEXT)], steps=2, batch=2, seq=8, seed=0)
    _, adapters = split_run(tiny4, [2], 4, batches, lr=2e-2, seed=3)
    out = save_adapters(tmp_path / "ad", adapters, spec, str(tiny4))
    base = LlamaForCausalLM.from_pretrained(str(tiny4), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    ours = TrainStage(tiny4, 0, 4, spec, 3)
    with torch.no_grad():
        for name, p in ours.named_adapters:
            p.copy_(adapters[name])
        x = batches[0][0]
        want = ours._run(x)
        got = model(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        untouched = model(input_ids=x).logits
    assert not torch.allclose(untouched, want, atol=1e-4)  # the adapters change the output
