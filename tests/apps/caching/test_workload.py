"""The workload: seeded and recorded, Zipf per cell, Poisson arrivals, mobility."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from testbed.apps.caching.workload import WorkloadSpec, digest, generate, load, popularity, save
from testbed.spec.errors import SpecError

MODELS = tuple(f"m{i:02d}" for i in range(30))
CELLS = (("e1", ("a1", "a2")), ("e2", ("b1", "b2")), ("e3", ("c1",)))
HOME = {d: e for e, devs in CELLS for d in devs}


def _spec(**kw) -> WorkloadSpec:
    return replace(WorkloadSpec(MODELS, CELLS, zipf=0.8, requests=4000, mobility=0.0, seed=5), **kw)


def test_same_seed_same_sequence_other_seed_other():
    a, b = generate(_spec()), generate(_spec())
    assert a == b and digest(a) == digest(b)
    other = generate(_spec(seed=6))
    assert other != a and digest(other) != digest(a)


def test_record_and_load_give_the_same_requests(tmp_path):
    spec = _spec(requests=200, mobility=0.3)
    reqs = generate(spec)
    path = save(tmp_path / "w.json", spec, reqs)
    spec2, reqs2 = load(path)
    assert spec2 == spec and reqs2 == reqs
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SpecError, match="format"):
        load(tmp_path / "bad.json")


def test_zipf_popularity_differs_per_cell():
    pop = popularity(_spec())
    for p in pop.values():
        assert p.sum() == pytest.approx(1.0)
        ranked = np.sort(p)[::-1]
        assert ranked[0] / ranked[9] == pytest.approx(10**0.8, rel=1e-6)  # p(k) ~ k^-0.8
    assert not np.allclose(pop["e1"], pop["e2"])
    # the measured frequencies follow the cell's distribution
    reqs = generate(_spec(requests=20_000))
    at_e1 = Counter(r.model for r in reqs if r.edge == "e1")
    n = sum(at_e1.values())
    top = MODELS[int(np.argmax(pop["e1"]))]
    assert at_e1[top] / n == pytest.approx(pop["e1"].max(), rel=0.15)
    flat = Counter(r.model for r in generate(_spec(zipf=0.0, requests=20_000)))
    assert max(flat.values()) / min(flat.values()) < 1.5


def test_poisson_arrivals():
    reqs = generate(_spec(rate_per_s=20.0))
    gaps = np.diff([r.t_s for r in reqs])
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.15)  # exponential: cv = 1


def test_mobility_moves_devices_to_other_cells():
    still = generate(_spec(requests=500))
    assert all(r.edge == HOME[r.device] for r in still) and not any(r.handover for r in still)
    moving = generate(_spec(mobility=0.25))
    share = sum(r.handover for r in moving) / len(moving)
    assert share == pytest.approx(0.25, abs=0.04)
    last: dict[str, str] = {}
    for r in moving:  # a device's next request goes to the cell it moved to
        if r.device in last:
            assert r.edge == last[r.device]
        last[r.device] = r.edge if not r.handover else "moved"
        if r.handover:
            nxt = next((q for q in moving[r.index + 1:] if q.device == r.device), None)
            if nxt is not None:
                assert nxt.edge != r.edge
            last.pop(r.device)


@pytest.mark.parametrize("field,value", [("zipf", -1.0), ("mobility", 1.5), ("requests", 0)])
def test_bad_values_are_spec_errors(field, value):
    with pytest.raises(SpecError):
        generate(_spec(**{field: value}))
