"""The edge block store: verified atomic puts, a hard byte capacity, eviction, restart, the RAM tier."""

from __future__ import annotations

import pytest
import torch

from testbed.apps.caching.blocks import BlockDir, BlockHashError, block_hash, decode_tensor, encode_tensor
from testbed.apps.caching.store import EdgeStore, StoreFull


def _block(seed: int, n: int = 1000) -> tuple[str, bytes]:
    data = encode_tensor(torch.randn(n, generator=torch.Generator().manual_seed(seed)))
    return block_hash(data), data


def test_tensor_blocks_are_deterministic_and_round_trip():
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert encode_tensor(t) == encode_tensor(t.clone())
    assert torch.equal(decode_tensor(encode_tensor(t)), t)
    assert block_hash(encode_tensor(t)) != block_hash(encode_tensor(t.to(torch.float16)))


def test_put_checks_the_hash_and_writes_nothing_on_a_mismatch(tmp_path):
    store = EdgeStore(tmp_path, capacity_bytes=100_000)
    h, data = _block(1)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(BlockHashError):
        store.put(h, bytes(bad))
    assert not store.has(h) and store.used_bytes == 0
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert store.put(h, data) is True and store.put(h, data) is False
    assert store.get(h) == data and store.used_bytes == len(data)


def test_capacity_is_a_hard_limit_and_evict_frees(tmp_path):
    blocks = [_block(i) for i in range(3)]
    size = len(blocks[0][1])
    store = EdgeStore(tmp_path, capacity_bytes=2 * size + 10)
    store.put(*blocks[0])
    store.put(*blocks[1])
    with pytest.raises(StoreFull):
        store.put(*blocks[2])
    assert not store.has(blocks[2][0]) and store.used_bytes == 2 * size
    assert store.evict(blocks[0][0]) == size and store.evict(blocks[0][0]) == 0
    store.put(*blocks[2])
    assert store.blocks() == {blocks[1][0], blocks[2][0]} and store.free_bytes == 10
    with pytest.raises(KeyError):
        store.get(blocks[0][0])


def test_a_restarted_store_keeps_its_blocks_and_drops_partial_writes(tmp_path):
    h, data = _block(7)
    store = EdgeStore(tmp_path, capacity_bytes=10_000)
    store.put(h, data)
    stray = BlockDir(tmp_path).path(h).parent / ".tmp-crashed"
    stray.write_bytes(data[:100])  # what a crash in the middle of a put leaves
    again = EdgeStore(tmp_path, capacity_bytes=10_000)
    assert again.blocks() == {h} and again.used_bytes == len(data)
    assert not stray.exists()


def test_ram_tier_holds_served_models_within_its_budget(tmp_path):
    a, b, c = (_block(i) for i in range(3))
    size = len(a[1])
    store = EdgeStore(tmp_path, capacity_bytes=10 * size, ram_bytes=2 * size)
    for h, data in (a, b, c):
        store.put(h, data)
    store.load("m1", [a[0], b[0]])
    store.load("m2", [b[0]])  # b shared: counted once
    assert store.in_ram("m1") and store.in_ram("m2") and store.ram_used_bytes == 2 * size
    store.load("m3", [c[0]])  # over budget: the least recently loaded model leaves RAM (not disk)
    assert not store.in_ram("m1") and store.in_ram("m3") and store.has(a[0])
    store.evict(c[0])
    assert c[0] not in store.load("m3", [])
    # a block damaged on disk is refused when loaded for serving
    store.dir.path(a[0]).write_bytes(b[1])
    with pytest.raises(BlockHashError):
        store.load("m4", [a[0]])
