"""kv_budget_mb: a shard node evicts the least recently used sessions' KV caches beyond its budget and
the clients rebuild them transparently (same tokens); int8 KV caches; the topology field."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from testbed.apps.inference.kv_cache import Entry, KvBudget, cache_bytes, new_int8_cache
from testbed.apps.inference.split_client import SplitClient
from testbed.model.generate import generate_split
from testbed.model.shard import Shard
from testbed.model.tiny import make_tiny_model_dir
from testbed.spec.errors import SpecError
from testbed.spec.topology import load_topology
from tests.apps.inference.threaded_node import Node

PROMPTS = [[3, 1, 4, 1, 5], [100, 4, 4, 61], [7, 8, 9], [250, 251, 3, 8, 12]]
N = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", n_layers=2, hidden=64)


def test_lru_order_and_counts() -> None:
    kv = KvBudget(budget_bytes=250)
    for sid in (1, 2, 3):
        kv.start(sid, object(), 0.0)
        kv.sessions[sid].nbytes = 100
    kv.get(1)  # 1 is now the most recently used: 2 goes first
    assert kv.enforce(keep=3, measure=lambda c: 100) == 1
    assert list(kv.sessions) == [3, 1] and kv.was_dropped(2) and kv.evictions == 1
    kv.start(2, object(), 0.0)  # the client re-prefills it
    assert kv.rebuilds == 1 and not kv.was_dropped(2)
    kv.drop(1, remember=False)  # closed: forgotten, not "evicted"
    assert not kv.was_dropped(1)
    assert isinstance(kv.sessions[3], Entry)
    alone = KvBudget(budget_bytes=10)
    alone.start(9, object(), 0.0)
    assert alone.enforce(keep=9, measure=lambda c: 100) == 0  # the session being served is never evicted


def test_sessions_beyond_the_budget_are_rebuilt_with_the_same_tokens(tiny: Path) -> None:
    shards = [Shard.load(tiny, 0, 1), Shard.load(tiny, 1, 2)]
    one = cache_bytes_of(shards[1], len(PROMPTS[0]) + N)
    node = Node(shards[1], None, kv_budget_bytes=int(1.5 * one))  # room for one session and a half
    results: dict[int, dict] = {}
    clients = [SplitClient(shards[0], node.addr, layers=["0:1", "1:2"], timeout_s=60) for _ in PROMPTS]
    try:
        def run(i: int) -> None:
            clients[i].connect()
            results[i] = clients[i].generate(torch.tensor([PROMPTS[i]]), N, set())

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, ids in enumerate(PROMPTS):
            assert results[i]["tokens"] == [int(t) for t in generate_split(shards, ids, N).tokens], i
        counters = node.server.counters(kv=True)
        hits, evictions, rebuilds = counters[4:7]
        assert evictions > 0 and rebuilds > 0 and hits > 0
        assert sum(r["kv_rebuilds"] for r in results.values()) == rebuilds
        assert counters[1] <= 1.5 * one + one  # within the budget but for the session being served
    finally:
        for c in clients:
            c.close()
        node.die()


def cache_bytes_of(shard: Shard, tokens: int) -> int:
    cache = shard.new_cache()
    shard.forward(torch.zeros((1, tokens, shard.hidden_size)), cache, 0)
    return cache_bytes(cache)


def test_int8_cache_agreement_and_size(tiny: Path) -> None:
    shard = Shard.load(tiny, 0, 2)
    seq = torch.tensor([[3, 1, 4, 1, 5, *range(10, 70)]])

    def teacher_forced(cache) -> torch.Tensor:
        outs = [shard.forward(seq[:, :5], cache, 0)[0, -1]]
        outs += [shard.forward(seq[:, p:p + 1], cache, p)[0, -1] for p in range(5, seq.shape[1])]
        return torch.stack(outs)

    full, small = shard.new_cache(), new_int8_cache()
    a, b = teacher_forced(full), teacher_forced(small)
    assert cache_bytes(small) < 0.45 * cache_bytes(full)  # int8 + a float scale per head and position
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
    assert (a - b).norm() / a.norm() < 0.05


def test_kv_budget_is_a_checked_node_field(tmp_path: Path) -> None:
    def topo(node: str) -> Path:
        p = tmp_path / "t.yaml"
        p.write_text(f"name: t\nnodes:\n  a: {{role: device}}\n  b: {node}\nlinks:\n  - between: [a, b]\n")
        return p

    t = load_topology(topo("{role: edge, kv_budget_mb: 64, kv_int8: true}"))
    assert t.nodes["b"].kv_budget_mb == 64 and t.nodes["b"].kv_int8
    assert load_topology(topo("{role: edge}")).nodes["b"].kv_budget_mb is None
    for body, why in [("{role: edge, kv_budget_mb: 0}", "kv_budget_mb"),
                      ("{role: edge, kv_budget_mb: 1.5}", "kv_budget_mb"),
                      ("{role: edge, kv_int8: 3}", "kv_int8")]:
        with pytest.raises(SpecError) as e:
            load_topology(topo(body))
        assert why in str(e.value) and "\n" not in str(e.value)
