"""Caching suites: the shipped one loads and expands; bad values are one-line errors naming the field;
a small replay suite (the tiny catalogue's manifests) runs through the runner end to end, its records
equal ``cache-run --replay``'s on the same seed, and a resumed run adds only what is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.apps.caching.analytic import cache_network
from testbed.apps.caching.catalogue import synthetic_catalogue
from testbed.apps.caching.replay import run_replay
from testbed.experiments.points import expand
from testbed.experiments.results import read_records
from testbed.experiments.runner import run_suite
from testbed.spec.errors import SpecError
from testbed.spec.suite import load_suite
from testbed.spec.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "experiments/caching.yaml"
# the tiny base's catalogue (manifests only), small enough that a point replays in milliseconds
TINY = ["workload.catalogue={base: tiny, adapters: 6, partial: 2, seed: 3}", "workload.requests=120",
        "sweep.policy=[lru, block-lru, trimcaching, optimal]", "sweep.capacity_bases=[1.5, 3]",
        "params.window=60", "repeats=2"]


def test_shipped_suite_expands():
    suite = load_suite(SUITE)
    assert suite.workload.kind == "caching" and not suite.baselines and not suite.placements
    points = expand(suite, 0)
    policies = {p.placement_name for p in points}
    assert policies == {"lru", "lfu", "block-lru", "trimcaching", "optimal"}
    assert len(points) == len(policies) * len(suite.sweep["capacity_bases"])
    for p in points:
        assert p.kind == "caching" and p.params["policy"] == p.placement_name
        assert p.id == f"{p.placement_name}/capacity_bases={p.labels['capacity_bases']}"
        assert p.params["cache_mode"] == "replay" and p.params["adapters"] == 40
        # only the proactive policies re-place every window requests: the others do not carry it
        assert ("window" in p.params) == (p.placement_name in ("trimcaching", "optimal"))


@pytest.mark.parametrize("sets,field,message", [
    (["sweep.policy=[fifo]"], "sweep.policy[0]", "must be one of lru, lfu"),
    (["sweep.capacity_bases=[0]"], "sweep.capacity_bases[0]", "> 0"),
    (["params.capacity_mb=2000"], "params.capacity_mb", "exactly one of capacity_mb and capacity_bases"),
    (["params.zipf=-1"], "params.zipf", ">= 0"),
    (["params.mobility=1.5"], "params.mobility", "<= 1"),
    (["params.cache_mode=live"], "params.cache_mode", "must be one of emulated, replay"),
    (["params.requests=0"], "params.requests", ">= 1"),
    (["params.kv_cache=true"], "params.kv_cache", "not a parameter of a caching workload"),
    (["params.uplink_mbit=10"], "params.uplink_mbit", "not a parameter of a caching workload"),
    (["workload.prompts=prompts/short.yaml"], "workload.prompts", "not a field of a caching workload"),
    (["workload.catalogue={base: huge}"], "workload.catalogue.base", "must be one of tiny, smollm2"),
    (["workload.catalogue={adapters: -1}"], "workload.catalogue.adapters", ">= 0"),
    (["workload.catalogue=/nonexistent"], "workload.catalogue", "not a catalogue folder"),
    (["baselines=[on-device]"], "baselines", "compares its policies"),
    (["sweep={capacity_bases: [2]}"], "params.policy", "missing"),
])
def test_bad_caching_suite_values(sets, field, message):
    with pytest.raises(SpecError) as e:
        load_suite(SUITE, sets)
    assert e.value.field == field and message in e.value.message, str(e.value)


def test_caching_param_refused_in_inference_suite():
    with pytest.raises(SpecError) as e:
        load_suite(REPO / "experiments/quick.yaml", ["params.policy=lru"])
    assert e.value.field == "params.policy" and "inference" in e.value.message


def test_variants_refused_with_a_built_catalogue(tmp_path):
    (tmp_path / "catalogue.json").write_text("{}")  # the validator only looks for the folder's index
    with pytest.raises(SpecError) as e:
        load_suite(SUITE, [f"workload.catalogue={tmp_path}", "params.adapters=4"])
    assert e.value.field == "params.adapters" and "generated catalogue" in e.value.message


@pytest.mark.parametrize("sets,field,message", [
    (["sweep.capacity_bases=[2, 1]"], "sweep.capacity_bases[1]", "smaller than the largest model"),
    (["workload.catalogue={base: tiny, adapters: 120, partial: 0}", "sweep.capacity_bases=[5]"],
     "sweep.policy[4]", "at most 100 models"),
    (["workload.catalogue={shared_layers: 30}"], "workload.catalogue.shared_layers", "must be in 0..29"),
])
def test_impossible_points_fail_before_running(tmp_path, sets, field, message):
    """Errors only the catalogue shows (a capacity below the largest model, a MILP too large) come when
    the suite is planned, before any point runs, naming the suite's field."""
    started: list[int] = []
    with pytest.raises(SpecError) as e:
        run_suite(load_suite(SUITE, sets), tmp_path, on_start=started.append)
    assert (e.value.field, started) == (field, []) and message in e.value.message
    assert not (tmp_path / "results.jsonl").exists()


def test_bad_value_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "testbed", "run", str(SUITE), "--out", str(tmp_path),
                           "--set", "sweep.policy=[fifo]"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("--set: sweep.policy[0]: must be one of") and "(got 'fifo')" in line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caching-suite")
    run_suite(load_suite(SUITE, TINY), out)
    return out


def test_tiny_replay_suite_records(tiny_run):
    records = read_records(tiny_run / "results.jsonl")
    assert len(records) == 4 * 2 * 2 and all(r["status"] == "ok" for r in records), \
        [r.get("error") for r in records]
    digests: dict[int, set[str]] = {}
    for r in records:
        c, m = r["caching"], r["metrics"]
        assert r["kind"] == "caching" and r["config"]["workload"] == "caching"
        assert c["mode"] == "replay" and c["policy"] == r["placement_name"] and c["requests"] == 120
        assert c["seed"] == 1 + r["repeat"]  # each repeat its own workload
        assert c["capacity_bases"] == pytest.approx(r["params"]["capacity_bases"], rel=1e-3)
        assert 0 <= m["hit_ratio"] <= 1 and m["generated_variants"] == 8 and m["models"] == 10
        q = c["ttft_ms_quantiles"]
        assert len(q) == 201 and q == sorted(q) and q[100] == pytest.approx(m["ttft_ms_p50"], abs=1e-3)
        digests.setdefault(r["repeat"], set()).add(c["workload_digest"])
    # every policy of a repeat serves the same requests; the repeats differ
    assert all(len(d) == 1 for d in digests.values()) and len(set().union(*digests.values())) == 2


def test_suite_point_is_cache_run_replay(tiny_run):
    """A record's figures are those of ``cache-run --replay`` with the point's parameters and seed."""
    rec = next(r for r in read_records(tiny_run / "results.jsonl")
               if r["point"] == "trimcaching/capacity_bases=3" and r["repeat"] == 1)
    cat = synthetic_catalogue(6, 2, "tiny", 3)
    base = max(cat.model_bytes(b) for b in cat.bases())
    direct = run_replay(cat, cache_network(load_topology(REPO / "topologies/cells-3.yaml")), "trimcaching",
                        int(3 * base), zipf=0.8, requests=120, mobility=0.1, seed=2, window=60)
    for key in ("hit_ratio", "byte_hit_ratio", "backhaul_bytes", "edge_to_edge_bytes", "evictions",
                "ttft_ms_p95", "workload_digest", "storage_used_bytes"):
        assert rec["caching"][key] == direct[key], key


def test_resume_runs_only_what_is_missing(tiny_run, tmp_path):
    results = tmp_path / "results.jsonl"
    lines = (tiny_run / "results.jsonl").read_bytes().splitlines(keepends=True)
    results.write_bytes(b"".join(lines[:5]) + lines[5][:40])  # five records and a torn sixth
    started: list[tuple[str, int]] = []
    suite = load_suite(SUITE, TINY)
    run_suite(suite, tmp_path, resume=True,
              on_task=lambda p, r, rec: started.append((p.id, r)) if rec is None else None)
    before = {(json.loads(x)["point"], json.loads(x)["repeat"]) for x in lines[:5]}
    assert len(started) == 16 - 5 and not before & set(started)
    again = read_records(results)
    assert len(again) == 16 and {(r["point"], r["repeat"]) for r in again} == \
        {(r["point"], r["repeat"]) for r in read_records(tiny_run / "results.jsonl")}
    starts: list[int] = []
    run_suite(suite, tmp_path, resume=True, on_start=starts.append)
    assert starts == [0] and len(read_records(results)) == 16
