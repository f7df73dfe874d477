"""SmolLM2-135M: split == unsplit exactly, and quantized agreement on a prefix of the shipped text."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from testbed.model.evaluation import agreement, text_ids
from testbed.model.generate import generate_split, load_shards
from testbed.model.loading import default_model_dir, format_prompt, load_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.fixture(scope="module")
def model_dir():
    return default_model_dir()


@pytest.fixture(scope="module")
def reference(model_dir):
    return LlamaForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def prompt(model_dir) -> list[int]:
    return format_prompt(load_tokenizer(model_dir), "Name three colours of the rainbow.")


def test_converted_checkpoint_layout(model_dir) -> None:
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "gguf_q4.safetensors"} <= names
    assert "quantization_config" not in (model_dir / "config.json").read_text()


@pytest.mark.parametrize("cuts", [[8, 20], [1], [29]], ids=["8-20", "1", "29"])
def test_split_equals_unsplit(model_dir, reference, prompt, cuts) -> None:
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        want_logits = reference(torch.tensor([prompt])).logits
    want = out[0, len(prompt):].tolist()
    shards = load_shards(model_dir, cuts)
    h = torch.tensor([prompt])
    for s in shards:
        h = s(h, s.new_cache(), 0)
    assert float((h - want_logits).abs().max()) == 0.0
    assert generate_split(shards, prompt, 8, kv_cache=True).tokens == want
    assert generate_split(shards, prompt, 8, kv_cache=False).tokens == want


# the targets, on the whole shipped text (2,672 tokens): int4 >= 99 %, int8 >= 97 %
@pytest.mark.parametrize(("quant", "floor"), [("int4", 0.99), ("int8", 0.97)])
def test_quantized_agreement(model_dir, quant, floor) -> None:
    ids = text_ids(load_tokenizer(model_dir), None, None)
    ref, test = load_shards(model_dir, [], "none"), load_shards(model_dir, [], quant)
    if quant == "int4":
        assert test[0].int4_source == "gguf-q4_1"
    a = agreement(ref, test, ids)
    assert a["tokens"] > 2000
    assert a["top1_agreement"] >= floor, a
