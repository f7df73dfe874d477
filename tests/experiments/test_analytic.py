"""The analytic model's routing and arithmetic on the shipped topologies."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.experiments.analytic import FRAMING, path_figures, predict, route
from testbed.spec.topology import load_topology
from testbed.spec.traces import load_trace

REPO = Path(__file__).resolve().parents[2]


def test_route_through_a_cell_and_backhaul():
    topo = load_topology(REPO / "topologies/cell-4.yaml")
    assert len(route(topo, "dev3", "cloud")) == 3
    f = path_figures(topo, "dev3", "cloud")
    assert f.bw_mbit == 5 and f.delay_ms == 20 + 5 + 25
    back = path_figures(topo, "cloud", "dev3")
    assert back.bw_mbit == 20 and back.delay_ms == 50


def test_trace_counts_with_its_mean_capacity():
    topo = load_topology(REPO / "topologies/trace-lte.yaml")
    mean = load_trace(REPO / "topologies/traces/ge-lte.up").mean_mbit()
    assert path_figures(topo, "phone", "mec").bw_mbit == pytest.approx(mean)


def test_predict_adds_compute_serialization_and_delay():
    topo = load_topology(REPO / "topologies/device-edge-cloud.yaml")
    result = {
        "token_ms": [100.0, 50.0, 50.0, 50.0],
        "per_hop": [
            {"compute_ms": 40.0, "codec_ms": 2.0},
            {
                "compute_ms": 30.0,
                "codec_ms": 1.0,
                "bytes_up": 125_000,
                "bytes_down": 500,
                "transfer_ms": 200.0,
            },
        ],
    }
    pred = predict(topo, "phone=0:8,mec=8:30", result)
    ser = 125_000 * FRAMING * 8 / 10e3 + 500 * FRAMING * 8 / 50e3  # 10 Mbit/s up, 50 down
    assert pred["e2e_ms"] == pytest.approx(42 + 31 + ser + 4 * 30, abs=1e-2)
    assert pred["per_token_ms"] == pytest.approx(pred["e2e_ms"] / 4, abs=1e-2)
    assert pred["per_hop"][1]["rtt_ms"] == 30



def test_route_through_two_cells_and_a_gateway():
    from testbed.spec.topology import parse_topology

    data = {
        "name": "two-cells",
        "nodes": {"ue": {"role": "device"}, "c1": {"role": "cell"}, "gw": {"role": "edge"},
                  "c2": {"role": "cell"}, "srv": {"role": "cloud"}},
        "links": [
            {"between": [a, b], "up": {"bw_mbit": bu, "delay_ms": du},
             "down": {"bw_mbit": bd, "delay_ms": dd}}
            for a, b, bu, du, bd, dd in (("ue", "c1", 10, 1, 40, 2), ("gw", "c1", 30, 4, 5, 8),
                                         ("c2", "gw", 50, 16, 60, 32), ("srv", "c2", 70, 64, 80, 128))
        ],
    }
    topo = parse_topology(data, REPO / "two-cells.yaml")
    # ue -> c1 (up) -> gw (down of gw-c1) -> c2 (down of c2-gw) -> srv (down of srv-c2)
    assert [s.delay_ms for s in route(topo, "ue", "srv")] == [1, 8, 32, 128]
    assert [s.delay_ms for s in route(topo, "srv", "ue")] == [64, 16, 4, 2]
    f = path_figures(topo, "ue", "srv")
    assert (f.bw_mbit, f.delay_ms, f.links) == (5, 169, 4)
