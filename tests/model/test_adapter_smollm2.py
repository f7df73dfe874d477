"""SmolLM2-135M with a LoRA adapter: split shards that merge it give peft's merged model's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.model.generate import generate_split, load_shards
from testbed.model.loading import default_model_dir, format_prompt, load_tokenizer
from tests.model.lora_adapters import merged_greedy, save_peft_adapter

pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_smollm2_split_with_adapter_equals_merged(tmp_path: Path) -> None:
    model = default_model_dir()
    ids = format_prompt(load_tokenizer(model), "Name three colours of the rainbow.")
    adapter = save_peft_adapter(model, tmp_path / "a", layers=[2, 9, 25], scale=1.0)
    got = generate_split(load_shards(model, [4, 20], adapter=adapter), ids, 6).tokens
    assert got == merged_greedy(model, adapter, ids, len(got))
    assert got != merged_greedy(model, None, ids, len(got)), "the adapter changes nothing: a weak test"
