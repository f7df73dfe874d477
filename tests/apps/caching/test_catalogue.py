"""The catalogue: blocks named by their hash and stored once, bases and variants, peft's adapter format,
checkpoint files back from blocks, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from testbed import cli
from testbed.apps.caching import catalogue as catmod
from testbed.apps.caching.blocks import BlockDir, block_hash, decode_tensor
from testbed.apps.caching.catalogue import load_catalogue, synthetic_catalogue, write_model_dir

from .conftest import ADAPTERS, PARTIAL


def test_summary_counts_shared_blocks_once(tiny_catalogue):
    s = tiny_catalogue.summary()
    assert s["models"] == 2 + ADAPTERS + PARTIAL
    assert s["generated_variants"] == ADAPTERS + PARTIAL
    assert s["base_bytes"] == tiny_catalogue.models["tiny"].bytes
    assert s["total_bytes"] == sum(m.bytes for m in tiny_catalogue.models.values())
    # every fp32 variant repeats the base: stored once, the catalogue is far smaller than the sum
    assert s["base_bytes"] < s["unique_bytes"] < s["total_bytes"] / 2
    files = [p for p in (tiny_catalogue.root / "blocks").rglob("*") if p.is_file()]
    assert len(files) == s["blocks"] == len(tiny_catalogue.block_sizes)
    assert sum(p.stat().st_size for p in files) == s["unique_bytes"]


def test_every_block_is_named_by_its_sha256(tiny_catalogue):
    store = tiny_catalogue.blocks
    for h in store:
        assert block_hash(store.get(h)) == h
    load_catalogue(tiny_catalogue.root, verify=True)


def test_manifests_label_generated_variants(tiny_catalogue):
    for m in tiny_catalogue.models.values():
        raw = json.loads((tiny_catalogue.root / "manifests" / f"{m.name}.json").read_text())
        assert raw["generated"] is (m.kind != "base")
        assert raw["generated"] == m.generated


def _hashes(m, part=None):
    return {b.name: b.hash for b in m.blocks if part is None or b.part == part}


def test_partial_fine_tunes_share_their_bottom_layers(tiny_catalogue):
    base = _hashes(tiny_catalogue.models["tiny"])
    partials = [m for m in tiny_catalogue.models.values() if m.kind == "partial"]
    assert partials
    for m in partials:
        k = m.details["shared_layers"]
        assert 1 <= k < m.details["layers"]
        own = _hashes(m)
        for name, h in own.items():
            layer = catmod._layer_of(name)
            if layer is not None and layer >= k and name.endswith("proj.weight"):
                assert h != base[name], name
            elif layer is not None and layer < k or name == "model.embed_tokens.weight":
                assert h == base[name], name
        assert own["model.norm.weight"] != base["model.norm.weight"]


def test_int4_base_has_its_own_blocks_and_dequantizes_close(tiny_catalogue):
    fp32, int4 = tiny_catalogue.models["tiny"], tiny_catalogue.models["tiny-int4"]
    assert int4.bytes < fp32.bytes / 3
    shared = {b.name for b in fp32.blocks if b.hash in set(int4.hashes())}
    assert {n for n in shared if not n.endswith("norm.weight")} <= set(catmod.FILE_NAMES)
    read = tiny_catalogue.blocks.get
    deq = catmod.model_files(int4, read)["state"]
    ref = catmod.model_files(fp32, read)["state"]
    assert set(deq) == set(ref)
    w = "model.layers.0.mlp.up_proj.weight"
    step = (ref[w].max() - ref[w].min()) / 15
    assert (deq[w] - ref[w]).abs().max() <= step  # within one quantization step of its group
    assert not torch.equal(deq[w], ref[w])


def test_lora_adapters_are_in_peft_format(tiny_catalogue, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    loras = [m for m in tiny_catalogue.models.values() if m.kind == "lora"]
    assert len({m.details["rank"] for m in loras}) > 1
    assert len({tuple(m.details["target_modules"]) for m in loras}) > 1
    assert {m.base for m in loras} == {"tiny", "tiny-int4"}
    m = next(x for x in loras if x.base == "tiny")
    out = write_model_dir(m, tiny_catalogue.blocks.get, tmp_path / "model")
    model = LlamaForCausalLM.from_pretrained(str(out))
    cfg = m.details["peft_config"]
    want = get_peft_model_state_dict(get_peft_model(
        LlamaForCausalLM.from_pretrained(str(out)),
        LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"])))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(adapter) == set(want)
    assert all(adapter[k].shape == want[k].shape for k in want)
    peft_model = PeftModel.from_pretrained(model, str(out / "adapter"))
    loaded = get_peft_model_state_dict(peft_model)
    assert all(torch.equal(loaded[k], adapter[k]) for k in adapter)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        with_adapter = peft_model(ids).logits
        with peft_model.disable_adapter():
            without = peft_model(ids).logits
    assert not torch.allclose(with_adapter, without)  # the generated adapter changes the model


def test_base_round_trips_through_blocks(tiny_catalogue, tmp_path):
    m = tiny_catalogue.models["tiny"]
    out = write_model_dir(m, tiny_catalogue.blocks.get, tmp_path / "base")
    state = load_file(str(out / "model.safetensors"))
    for b in m.blocks:
        if b.kind == "tensor":
            assert torch.equal(state[b.name], decode_tensor(tiny_catalogue.blocks.get(b.hash)))
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


def test_synthetic_catalogue_has_the_real_layout(tiny_catalogue):
    syn = synthetic_catalogue(ADAPTERS, PARTIAL, base="tiny", seed=3)
    assert list(syn.models) == list(tiny_catalogue.models)
    for name, real in tiny_catalogue.models.items():
        fake = syn.models[name]
        assert fake.generated == real.generated
        real_tensors = {b.name for b in real.blocks if b.kind == "tensor"}
        assert {b.name for b in fake.blocks if b.kind == "tensor"} == real_tensors
        own_real = sum(b.bytes for b in real.blocks if b.part != "base")
        own_fake = sum(b.bytes for b in fake.blocks if b.part != "base")
        assert own_real == pytest.approx(own_fake, rel=0.05)
    # SmolLM2: a small adapter is far smaller than its base (the handover saving)
    big = synthetic_catalogue(40, 8, base="smollm2", seed=1)
    base = big.models["smollm2-135m"].bytes
    assert 500e6 < base < 560e6
    smallest = min(sum(b.bytes for b in m.blocks if b.part == "adapter")
                   for m in big.models.values() if m.kind == "lora")
    assert base / smallest >= 50


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _copy(cat, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(cat.root, dst)
    return dst


def test_unknown_block_in_a_manifest_is_one_line_exit_2(tiny_catalogue, tmp_path, capsys):
    root = _copy(tiny_catalogue, tmp_path)
    mpath = root / "manifests" / "lora-001.json"
    raw = json.loads(mpath.read_text())
    raw["blocks"][3]["hash"] = "ab" * 32
    mpath.write_text(json.dumps(raw))
    code, out, err = _run(["catalogue", "check", str(root)], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"{mpath}: blocks[3].hash: unknown block") and "(got 'abab" in err


def test_missing_block_file_and_damaged_block(tiny_catalogue, tmp_path, capsys):
    root = _copy(tiny_catalogue, tmp_path)
    store = BlockDir(root / "blocks")
    victim = tiny_catalogue.models["partial-000"].blocks[-1].hash
    damaged = tiny_catalogue.models["lora-000"].blocks[-1].hash
    data = bytearray(store.get(damaged))
    data[-1] ^= 0xFF
    store.path(damaged).write_bytes(bytes(data))
    code, _, err = _run(["catalogue", "check", str(root), "--verify"], capsys)
    assert code == 2 and err.startswith(f"{store.path(damaged)}: sha256: block bytes do not match its name")
    store.remove(victim)
    code, _, err = _run(["catalogue", "check", str(root)], capsys)
    assert code == 2 and "unknown block" in err and victim in err


def test_capacity_below_largest_model_and_unknown_policy(tiny_catalogue, cells3, capsys):
    args = ["cache-run", str(cells3), "--catalogue", str(tiny_catalogue.root), "--replay", "--requests", "10"]
    code, _, err = _run([*args, "--policy", "lru", "--capacity-mb", "0.1"], capsys)
    assert code == 2 and err.startswith("cache-run: --capacity-mb: smaller than the largest model")
    assert "(got 0.1)" in err and err.count("\n") == 1
    code, _, err = _run([*args, "--policy", "fifo", "--capacity-mb", "5"], capsys)
    assert code == 2 and err.startswith("cache-run: --policy: must be one of lru, lfu, block-lru")
    assert "(got 'fifo')" in err


def test_build_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep").write_text("x")
    code, _, err = _run(["catalogue", "build", "--out", str(occupied), "--base", "tiny"], capsys)
    assert code == 2 and "--out: exists and is not empty" in err
    assert [p.name for p in occupied.iterdir()] == ["keep"]

    def broken(*a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(catmod, "lora_shapes", broken)
    with pytest.raises(RuntimeError):
        catmod.build_catalogue(tmp_path / "new", 2, 0, base="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]  # no catalogue, no temporary folder
