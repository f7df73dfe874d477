"""Replay mode: the topology's caching view, the analytic delivery model, the item-7 fields, and the
same decisions for the same seed."""

from __future__ import annotations

import json

import pytest
import yaml

from testbed import cli
from testbed.apps.caching.analytic import AnalyticModel, PathInfo, cache_network, framing_bytes
from testbed.apps.caching.catalogue import synthetic_catalogue
from testbed.apps.caching.policies import make_policy, units_of
from testbed.apps.caching.replay import replay, run_replay, workload_for
from testbed.apps.caching.workload import generate
from testbed.spec.errors import SpecError
from testbed.spec.topology import load_topology, parse_topology

ITEM7 = ("policy", "requests", "hit_ratio", "byte_hit_ratio", "backhaul_bytes", "edge_to_edge_bytes",
         "fetch_ms_mean", "fetch_ms_p50", "fetch_ms_p95", "ttft_ms_p50", "ttft_ms_p95", "ttft_ms_p99",
         "storage_used_bytes", "evictions", "delivery_goodput_mbit", "mode", "generated_variants")


def test_cells3_caching_view(cells3):
    net = cache_network(load_topology(cells3))
    assert net.edges == ["edge1", "edge2", "edge3"] and net.repository == "cloud"
    assert net.cells == {"edge1": ["dev1a", "dev1b"], "edge2": ["dev2a", "dev2b"],
                         "edge3": ["dev3a", "dev3b"]}
    assert net.repo_path["edge2"] == PathInfo(50.0, 40.0, ("cloud", "edge2"))
    assert net.peers("edge1") == ["edge2", "edge3"]
    assert net.peer_path[("edge3", "edge1")].rate_mbit == 100.0
    assert net.device_path["dev3b"].rtt_ms == pytest.approx(22.0)


def test_analytic_fetch_time():
    path = PathInfo(50.0, 40.0, ("cloud", "edge"))
    payload = 50e6 / 8 * 1448 / 1500  # TCP payload bytes per second on a 50 Mbit/s link of 1500-byte packets
    flat = AnalyticModel(init_cwnd=0)
    assert flat.fetch_ms(0, path) == 0.0
    assert flat.fetch_ms(6_250_000, path) == pytest.approx(40.0 + 6_250_000 / payload * 1e3)
    m = AnalyticModel()
    # a reply within the initial window (10 segments): one round trip and its bytes
    assert m.fetch_ms(10_000, path) == pytest.approx(40.0 + 10_000 / payload * 1e3)
    # 0.9 MB from 10 segments, doubling per round trip: 14,480 + 28,960 + 57,920 + 115,840 + 231,680
    # (5 windows, each below the 241 kB bandwidth-delay product), then the rest at the rate
    rest = 900_000 - 14_480 * 31
    assert m.fetch_ms(900_000, path) == pytest.approx(40.0 * 6 + rest / payload * 1e3)
    # slow start costs the short transfer several round trips, the long one a fraction of its time
    assert m.fetch_ms(900_000, path) > 1.5 * flat.fetch_ms(900_000, path)
    assert m.fetch_ms(20_000_000, path) < 1.05 * flat.fetch_ms(20_000_000, path)
    # framing counts as bytes on the wire: a one-chunk block pays one reply header, a larger one its
    # chunk digests too
    assert framing_bytes(0) == 0 and framing_bytes(1000) == 72 + 18
    assert framing_bytes(3 * 128 * 1024) == 4 * (72 + 18) + 3 * 32
    assert m.fetch_ms(900_000, path, 9_000) > m.fetch_ms(900_000, path)
    assert m.ttft_ms(100.0, 2_000_000, PathInfo(40, 20, ())) == pytest.approx(100 + 20 + 0.3)


def _isolated(cells3, tmp_path):
    """cells-3 without the edge ring: every miss must come from the repository."""
    data = yaml.safe_load(cells3.read_text())
    data["links"] = [lk for lk in data["links"] if not all(n.startswith("edge") for n in lk["between"])]
    return parse_topology(data, tmp_path / "isolated.yaml")


def test_replay_fields_and_sources(tiny_catalogue, cells3, tmp_path):
    net = cache_network(load_topology(cells3))
    cap = int(tiny_catalogue.largest_model_bytes() * 3)
    out = run_replay(tiny_catalogue, net, "block-lru", cap, zipf=0.8, requests=400, mobility=0.2, seed=2)
    for k in ITEM7:
        assert k in out, k
    assert out["mode"] == "replay" and out["requests"] == 400 and out["generated_variants"] == 8
    assert 0 < out["hit_ratio"] < out["byte_hit_ratio"] <= 1  # shared base blocks count as byte hits
    assert out["edge_to_edge_bytes"] > 0 and out["backhaul_bytes"] > 0
    assert set(out["storage_used_bytes"]) == set(net.edges)
    assert all(0 < v <= cap for v in out["storage_used_bytes"].values())
    assert out["fetch_ms_p50"] <= out["fetch_ms_p95"] and out["ttft_ms_p50"] <= out["ttft_ms_p99"]
    assert 0 < out["delivery_goodput_mbit"] <= 100
    alone = run_replay(tiny_catalogue, cache_network(_isolated(cells3, tmp_path)), "block-lru", cap, zipf=0.8,
                       requests=400, mobility=0.2, seed=2)
    assert alone["edge_to_edge_bytes"] == 0 and alone["hit_ratio"] == out["hit_ratio"]
    assert alone["fetch_ms_mean"] > out["fetch_ms_mean"]  # the ring is nearer than the cloud


def test_same_seed_same_hits_and_misses(tiny_catalogue, cells3):
    net = cache_network(load_topology(cells3))
    units = units_of(tiny_catalogue)
    cap = int(tiny_catalogue.largest_model_bytes() * 3)
    reqs = generate(workload_for(tiny_catalogue, net, 0.8, 300, 0.1, 7))
    runs = []
    for sizes in (None, None, tiny_catalogue.block_sizes):
        policy = make_policy("trimcaching", units, net.edges, cap, seed=7, window=50)
        runs.append(replay(units, net, policy, reqs, block_sizes=sizes))
    for k in ("hit_ratio", "backhaul_bytes", "edge_to_edge_bytes", "fetch_ms_mean", "evictions"):
        assert runs[0][k] == runs[1][k], k
    # with the blocks' sizes the protocol's framing counts too: the same decisions, a little more time
    assert runs[2]["hit_ratio"] == runs[0]["hit_ratio"]
    assert runs[0]["fetch_ms_mean"] < runs[2]["fetch_ms_mean"] < 1.1 * runs[0]["fetch_ms_mean"]


def test_block_aware_beats_whole_model_lru(cells3):
    cat = synthetic_catalogue(40, 4, base="tiny", seed=1)
    net = cache_network(load_topology(cells3))
    cap = cat.models["tiny"].bytes * 3
    res = {p: run_replay(cat, net, p, cap, zipf=0.8, requests=3000, mobility=0.1, seed=1)
           for p in ("lru", "block-lru", "trimcaching")}
    assert res["trimcaching"]["hit_ratio"] > 1.5 * res["lru"]["hit_ratio"]
    assert res["block-lru"]["hit_ratio"] > res["lru"]["hit_ratio"]
    assert res["block-lru"]["backhaul_bytes"] < res["lru"]["backhaul_bytes"]


def test_cache_run_replay_command(tiny_catalogue, cells3, capsys):
    cap_mb = tiny_catalogue.largest_model_bytes() * 2 / 1e6
    code = cli.main(["cache-run", str(cells3), "--catalogue", str(tiny_catalogue.root), "--policy", "lfu",
                     "--capacity-mb", str(cap_mb), "--requests", "50", "--replay", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["policy"] == "lfu" and out["requests"] == 50 and out["mode"] == "replay"


def test_topology_without_cloud_is_a_spec_error(tmp_path):
    data = {"name": "x", "nodes": {"d": {"role": "device"}, "e": {"role": "edge"}},
            "links": [{"between": ["d", "e"]}]}
    with pytest.raises(SpecError, match="exactly one cloud"):
        cache_network(parse_topology(data, tmp_path / "x.yaml"))
