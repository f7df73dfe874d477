"""Placement policies on sizes-only catalogues: capacity kept, whole-model vs block-aware accounting,
eviction orders, the greedy against the exact MILP and against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from testbed.apps.caching.catalogue import synthetic_catalogue
from testbed.apps.caching.policies import (
    POLICIES,
    Units,
    greedy_placement,
    make_policy,
    milp_placement,
    placement_value,
    units_of,
)
from testbed.apps.caching.workload import WorkloadSpec, generate
from testbed.spec.errors import SpecError

EDGES = ["e1", "e2"]


@pytest.fixture(scope="module")
def units() -> Units:
    return units_of(synthetic_catalogue(12, 4, base="tiny", seed=2))


def _lora_pair(units: Units) -> tuple[str, str]:
    cat = [m for m in units.models if m.startswith("lora")]
    same_base = [(a, b) for a, b in itertools.combinations(cat, 2)
                 if set(units.units(a)) & set(units.units(b))]
    return same_base[0]


def test_units_partition_the_blocks(units):
    cat = synthetic_catalogue(12, 4, base="tiny", seed=2)
    assert sum(len(b) for b in units.unit_blocks) == len(cat.block_sizes)
    assert int(units.size.sum()) == cat.summary()["unique_bytes"]
    for name, m in cat.models.items():
        assert int(units.model_bytes[units.index[name]]) == m.bytes
        assert sorted(units.blocks(units.units(name))) == sorted(m.hashes())


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_keeps_capacity_and_answers_consistently(units, name):
    cap = int(units.model_bytes.max() * 2.5)
    policy = make_policy(name, units, EDGES, cap, seed=1, window=25)
    spec = WorkloadSpec(tuple(units.models), (("e1", ("d1",)), ("e2", ("d2",))), zipf=0.9, requests=300,
                        mobility=0.2, seed=4)
    hits = 0
    for r in generate(spec):
        before = policy.hit(r.edge, r.model)
        plan = policy.request(r.edge, r.model)
        assert plan.hit == before
        hits += plan.hit
        if plan.hit:
            assert plan.fetch == [] and plan.present_bytes == units.model_bytes[units.index[r.model]]
        else:
            assert plan.fetch and set(plan.store) <= set(plan.fetch)
        for e in EDGES:
            assert policy.used_bytes(e) == units.bytes_of(policy.present(e)) <= cap
        for e, p in policy.placement().items():
            assert policy.used_bytes(e) <= cap and not p.hit
        if not policy.proactive and not plan.hit:
            assert policy.hit(r.edge, r.model)  # reactive caches keep what they just fetched
    assert 0 < hits < 300


def test_whole_model_counts_the_base_twice_block_lru_once(units):
    a, b = _lora_pair(units)
    ia, ib = units.index[a], units.index[b]
    shared = units.bytes_of(set(units.units(a)) & set(units.units(b)))
    cap = int(units.model_bytes[ia] + units.model_bytes[ib] - shared // 2)  # both fit only if shared once
    lru = make_policy("lru", units, EDGES, cap)
    blk = make_policy("block-lru", units, EDGES, cap)
    for p in (lru, blk):
        p.request("e1", a)
    second = lru.request("e1", b)
    assert units.bytes_of(second.fetch) == units.model_bytes[ib]  # the whole model travels
    assert second.evict and not lru.hit("e1", a)
    second = blk.request("e1", b)
    assert units.bytes_of(second.fetch) == units.model_bytes[ib] - shared  # only what is missing
    assert second.present_bytes == shared and not second.evict
    assert blk.hit("e1", a) and blk.hit("e1", b)


def test_lru_lfu_and_random_pick_different_victims(units):
    x, y, z = sorted(units.models, key=lambda m: units.model_bytes[units.index[m]])[-3:]
    sizes = sorted(int(units.model_bytes[units.index[m]]) for m in (x, y, z))
    cap = sizes[1] + sizes[2]  # any two fit, never three
    lru, lfu = make_policy("lru", units, EDGES, cap), make_policy("lfu", units, EDGES, cap)
    for p in (lru, lfu):
        for m in (x, x, x, y, z):
            p.request("e1", m)
    assert {m for m in units.models if lru.hit("e1", m)} == {y, z}  # x: least recently used
    assert {m for m in units.models if lfu.hit("e1", m)} == {x, z}  # y: least frequently used
    runs = []
    for _ in range(2):
        rnd = make_policy("random", units, EDGES, cap, seed=9)
        for m in (x, y, z, x, y, z):
            rnd.request("e1", m)
        runs.append(sorted(rnd.present("e1")))
    assert runs[0] == runs[1]  # seeded


def _brute_force(units: Units, pop: np.ndarray, cap: int) -> float:
    cand = [int(m) for m in np.flatnonzero(pop > 0)]
    best = 0.0
    for k in range(len(cand) + 1):
        for combo in itertools.combinations(cand, k):
            if units.bytes_of({int(u) for m in combo for u in units.model_units[m]}) <= cap:
                best = max(best, placement_value(units, pop, combo))
    return best


def test_milp_is_exact_and_greedy_close(units):
    rng = np.random.default_rng(0)
    small = units_of(synthetic_catalogue(6, 2, base="tiny", seed=5))
    gaps = []
    for _ in range(4):
        pop = rng.zipf(1.5, size=len(small.models)).astype(float)
        cap = int(small.model_bytes.max() * rng.uniform(1.2, 2.5))
        exact = milp_placement(small, pop, cap)
        greedy = greedy_placement(small, pop, cap)
        for chosen in (exact, greedy):
            assert small.bytes_of({int(u) for m in chosen for u in small.model_units[m]}) <= cap
        best = _brute_force(small, pop, cap)
        assert placement_value(small, pop, exact) == pytest.approx(best)
        gaps.append(placement_value(small, pop, greedy) / best)
    assert min(gaps) > 0.8


def test_trimcaching_places_the_popular_models_every_window(units):
    cap = int(units.model_bytes.max() * 3)
    policy = make_policy("trimcaching", units, EDGES, cap, window=10)
    favourite = next(m for m in units.models if m.startswith("lora"))
    for i in range(9):
        policy.request("e2", favourite if i % 2 else units.models[i])
        assert policy.placement() == {}
    policy.request("e2", favourite)
    plans = policy.placement()
    assert set(plans) <= set(EDGES) and policy.hit("e2", favourite)
    assert not policy.present("e1")  # nothing asked at e1: nothing placed there


def test_bad_policy_capacity_and_oversized_optimal(units):
    with pytest.raises(SpecError, match="--policy: must be one of"):
        make_policy("fifo", units, EDGES, 10**9)
    with pytest.raises(SpecError, match="--capacity-mb: smaller than the largest model"):
        make_policy("lru", units, EDGES, int(units.model_bytes.max()) - 1)
    big = units_of(synthetic_catalogue(120, 0, base="tiny"))
    with pytest.raises(SpecError, match="optimal solves a MILP"):
        make_policy("optimal", big, EDGES, 10**9)
