"""Device energy ESTIMATE from a stated model (not a measurement).

    energy_J = compute_w x busy_s + idle_w x (e2e_s - busy_s)
             + tx_nj_per_bit x bits sent + rx_nj_per_bit x bits received

``busy`` is the device's measured compute and codec time; bits are the measured
bytes on the device's first link.  The coefficients come from the suite's
``energy:`` block (defaults in ``testbed.spec.suite.EnergyModel``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from testbed.spec.suite import EnergyModel


def estimate(model: EnergyModel, busy_ms: float, e2e_ms: float, bytes_up: float, bytes_down: float,
             tokens: int) -> dict[str, Any]:
    busy_s, wait_s = busy_ms / 1e3, max(0.0, e2e_ms - busy_ms) / 1e3
    compute_j = model.compute_w * busy_s
    idle_j = model.idle_w * wait_s
    radio_j = (model.tx_nj_per_bit * bytes_up * 8 + model.rx_nj_per_bit * bytes_down * 8) * 1e-9
    total = compute_j + idle_j + radio_j
    return {
        "label": "estimate (model, not measured)",
        "model": asdict(model),
        "compute_j": round(compute_j, 6),
        "idle_j": round(idle_j, 6),
        "radio_j": round(radio_j, 6),
        "total_j": round(total, 6),
        "per_token_mj": round(total / tokens * 1e3, 4) if tokens else None,
    }
