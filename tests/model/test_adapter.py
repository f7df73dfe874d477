"""LoRA adapters (peft's format) merged into shards: equal to peft's merged model, and checked first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from testbed.model.adapter import check_adapter, folder_problem
from testbed.model.generate import generate_split, load_shards
from testbed.model.shard import Shard
from testbed.model.tiny import make_tiny_model_dir
from testbed.spec.errors import SpecError
from tests.model.lora_adapters import merged_greedy, save_peft_adapter

PROMPT = [5, 17, 33, 2, 9, 41]


@pytest.fixture(scope="module")
def adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRA on layers 0, 2 and 3 of the 4-layer tiny model (layer 1 has none)."""
    return save_peft_adapter(tiny_dir, tmp_path_factory.mktemp("lora") / "a", layers=[0, 2, 3])


def test_shards_merge_exactly_what_peft_merges(tiny_dir: Path, adapter: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(tiny_dir)), str(adapter))
    ref = ref.merge_and_unload().state_dict()
    base = Shard.load(tiny_dir, 1, 4)
    shard = Shard.load(tiny_dir, 1, 4, adapter=adapter)
    assert shard.adapter_layers == [2, 3]  # its own layers the adapter covers
    changed = set()
    for name, p in shard.named_parameters():
        if not name.startswith("layers."):
            continue
        _, local, rest = name.split(".", 2)
        full = f"model.layers.{1 + int(local)}.{rest}"
        assert torch.equal(p, ref[full]), name  # bit for bit: the same merge
        if not torch.equal(p, base.get_parameter(name)):
            changed.add(full.rsplit(".", 1)[0])
    assert changed == {f"model.layers.{i}.{m}" for i in (2, 3)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert not any(p.requires_grad for p in shard.parameters())


def test_split_greedy_tokens_equal_the_merged_model(tiny_dir: Path, adapter: Path) -> None:
    n = 8
    got = generate_split(load_shards(tiny_dir, [1, 3], adapter=adapter), PROMPT, n).tokens
    assert got == merged_greedy(tiny_dir, adapter, PROMPT, len(got))
    assert got != merged_greedy(tiny_dir, None, PROMPT, len(got)), "the adapter changes nothing: a weak test"


def test_a_quantized_shard_quantizes_the_merged_weights(tiny_dir: Path, adapter: Path) -> None:
    ids = torch.tensor([PROMPT])
    merged = Shard.load(tiny_dir, 0, 4, adapter=adapter)(ids)
    base = Shard.load(tiny_dir, 0, 4)(ids)
    q = Shard.load(tiny_dir, 0, 4, quant="int8", adapter=adapter)
    out = q(ids)
    assert q.adapter_layers == [0, 2, 3] and q.quant == "int8"
    assert (out - merged).abs().max() < 0.5 * (base - merged).abs().max()


def _problem(path: Path, model: Path) -> str:
    with pytest.raises(SpecError) as e:
        check_adapter(path, model)
    text = str(e.value)
    assert "\n" not in text
    return text


def test_check_adapter_names_what_does_not_fit(tiny_dir: Path, adapter: Path, tmp_path: Path) -> None:
    info = check_adapter(adapter, tiny_dir)
    assert info.layers == (0, 2, 3) and info.rank == 4 and info.targets == ("down_proj", "q_proj", "v_proj")

    assert _problem(tmp_path / "nowhere", tiny_dir).startswith("--adapter: adapter: must be a peft adapter "
                                                              "folder (no such folder) (got ")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(adapter / "adapter_config.json", half)
    assert "no adapter_model.safetensors" in _problem(half, tiny_dir)
    assert folder_problem(half) == "must be a peft adapter folder (no adapter_model.safetensors)"

    # another base: a narrower model (the shapes), a shallower one (the layers)
    narrow = make_tiny_model_dir(tmp_path / "narrow", n_layers=4, hidden=32)
    text = _problem(adapter, narrow)
    assert text.startswith(f"{adapter / 'adapter_model.safetensors'}: base_model.model.model.layers.0.")
    assert "do not fit the base's mlp.down_proj (128 in, 32 out)" in text
    assert text.endswith("(got [[4, 192], [64, 4]])")
    shallow = make_tiny_model_dir(tmp_path / "shallow", n_layers=3, hidden=64)
    text = _problem(adapter, shallow)
    assert text.startswith(f"{adapter / 'adapter_model.safetensors'}: layers: layer 3 is not one of the "
                           "model's 3 layers")

    # kinds of adapter a shard cannot merge
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert _problem(dora, tiny_dir) == f"{dora / 'adapter_config.json'}: use_dora: cannot be served: " \
                                       "plain LoRA only (got True)"
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    assert _problem(dora, tiny_dir).endswith("r: base_model.model.model.layers.0.mlp.down_proj has rank 4, "
                                             "the config another (got 8)")
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    assert "peft_type: only LoRA adapters can be served (got 'IA3')" in _problem(dora, tiny_dir)
    head = save_peft_adapter(tiny_dir, tmp_path / "head", targets=("q_proj", "lm_head"))
    assert "lm_head" in _problem(head, tiny_dir) and "only lora_A/lora_B of decoder layers" in \
        _problem(head, tiny_dir)
