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
