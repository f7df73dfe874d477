"""The device energy estimate follows its stated model exactly."""

from __future__ import annotations

import pytest

from testbed.experiments.energy import estimate
from testbed.spec.suite import EnergyModel


def test_energy_estimate_terms():
    model = EnergyModel(compute_w=2.0, idle_w=0.5, tx_nj_per_bit=100.0, rx_nj_per_bit=50.0)
    e = estimate(model, busy_ms=300.0, e2e_ms=1000.0, bytes_up=10_000, bytes_down=2_000, tokens=10)
    assert e["compute_j"] == pytest.approx(0.6)  # 2 W x 0.3 s
    assert e["idle_j"] == pytest.approx(0.35)  # 0.5 W x 0.7 s
    assert e["radio_j"] == pytest.approx(100e-9 * 80_000 + 50e-9 * 16_000)
    assert e["total_j"] == pytest.approx(e["compute_j"] + e["idle_j"] + e["radio_j"])
    assert e["per_token_mj"] == pytest.approx(e["total_j"] / 10 * 1e3, rel=1e-4)
    assert e["label"].startswith("estimate") and e["model"]["compute_w"] == 2.0


def test_no_radio_energy_without_traffic():
    e = estimate(EnergyModel(), busy_ms=500.0, e2e_ms=500.0, bytes_up=0, bytes_down=0, tokens=4)
    assert (
        e["radio_j"] == 0
        and e["idle_j"] == 0
        and e["compute_j"] == pytest.approx(EnergyModel().compute_w * 0.5)
    )
