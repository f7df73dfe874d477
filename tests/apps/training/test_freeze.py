"""Freezing ratios -> adapter layers (lowest frozen), and the smashed-data store with its byte count."""

from __future__ import annotations

import pytest
import torch

from testbed.apps.training import data
from testbed.apps.training.defaults import lora_config
from testbed.apps.training.freeze import SmashedStore, adapter_layers, check_ratio, frozen_count
from testbed.spec.errors import SpecError


@pytest.mark.parametrize(("n", "ratio", "frozen"), [
    (4, 0.0, 0), (4, 0.25, 1), (4, 0.5, 2), (4, 0.74, 2), (4, 0.75, 3), (4, 1.0, 4),
    (26, 0.5, 13), (100, 0.29, 29), (10, 0.7, 7), (3, 0.99, 2), (0, 0.5, 0),
])
def test_frozen_count_is_floor_of_the_fraction(n: int, ratio: float, frozen: int) -> None:
    assert frozen_count(n, ratio) == frozen


def test_lowest_layers_of_each_side_are_frozen() -> None:
    client, server = range(0, 4), range(4, 30)
    assert adapter_layers(client, 0.5) == [2, 3]
    assert adapter_layers(client, 0.0) == [0, 1, 2, 3]
    assert adapter_layers(client, 1.0) == []  # fully frozen: forward only
    assert adapter_layers(server, 0.5) == list(range(17, 30))
    assert adapter_layers([22, 2, 12, 7], 0.5) == [12, 22]  # unsorted or gapped sides (several hops)


def test_the_adapter_layers_are_what_peft_targets() -> None:
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    keep = adapter_layers(range(4), 0.5)
    model = get_peft_model(LlamaForCausalLM(cfg), lora_config(rank=2, targets=["q_proj", "v_proj"],
                                                              layers=keep))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {int(n.split("layers.")[1].split(".")[0]) for n in names} == {2, 3}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}


def test_bad_ratios_are_one_line() -> None:
    assert check_ratio("0.25", "--freeze-client") == 0.25
    for bad in ("1.5", "-0.1", "half", "nan", None):
        with pytest.raises(SpecError) as e:
            check_ratio(bad, "--freeze-server")
        assert str(e.value).startswith(
            "--freeze-server: freeze-server: a fraction of the layers from 0 to 1 (got ")
    with pytest.raises(ValueError):
        frozen_count(4, 1.5)


def test_store_uploads_once_then_reuses_and_counts_bytes() -> None:
    """Two epochs of a frozen client over real batches: epoch 0 uploads, epoch 1 comes from the store."""
    batches = data.Batches(torch.arange(401), batch=4, seq=10, seed=3)  # 40 windows: 10 batches an epoch
    acts = lambda ids: torch.stack([torch.full((10, 6), float(i)) for i in ids])  # noqa: E731
    store = SmashedStore()
    sent = 0
    for _ in range(20):
        b = batches.next()
        first = [s for s, e in zip(b.sample_ids, b.epochs, strict=True) if e == 0]
        assert store.missing(b.sample_ids) == first  # the edge lacks exactly the first-epoch samples
        if first:
            wire = 4 * 10 * 6 * 2 + 7  # e.g. fp16 on the wire plus a header: not a multiple of the rows
            store.put(b.sample_ids, acts(b.sample_ids), wire_bytes=wire)
            sent += wire
        else:
            assert torch.equal(store.get(b.sample_ids), acts(b.sample_ids))
    assert len(store) == 40 and store.reused == 40
    assert store.bytes_uploaded == sent == 10 * 487
    assert store.bytes_saved == sent  # every sample reused once: its upload's bytes saved once
    assert store.bytes_held == 40 * 10 * 6 * 4
    assert store.stats()["bytes_saved"] == sent


def test_store_keeps_a_copy_and_refuses_mismatches() -> None:
    store = SmashedStore()
    x = torch.ones(2, 3, requires_grad=True)
    store.put([5, 9], x * 2)
    kept = store.get([9, 5])
    assert not kept.requires_grad and torch.equal(kept, torch.full((2, 3), 2.0))
    assert store.bytes_uploaded == 24 and store.bytes_saved == 24
    with pytest.raises(KeyError, match=r"\[1\]"):
        store.get([5, 1])
    with pytest.raises(ValueError, match="2 sample ids for 3 rows"):
        store.put([1, 2], torch.zeros(3, 4))
    with pytest.raises(ValueError, match="repeat"):
        store.put([1, 1], torch.zeros(2, 4))
