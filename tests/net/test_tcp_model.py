"""TCP's slow start on a cold connection, as the applications' analytic models count it."""

from __future__ import annotations

import pytest

from testbed.net.tcp_model import INIT_CWND, MSS, payload_rate, slow_start_s, transfer_s


def test_a_message_within_the_first_window_takes_one_round_trip_and_its_bytes() -> None:
    n = INIT_CWND * MSS
    assert transfer_s(n, 100.0, 40.0) == pytest.approx(0.040 + n / payload_rate(100.0))


def test_slow_start_of_a_590_kb_message_over_400_mbit_and_40_ms() -> None:
    # windows of 10, 20, 40, 80, 160 segments (448 kB) go one round trip apart before the window
    # covers the 1.9 MB bandwidth-delay product: five rounds, the rest at the rate
    n = 590_000
    left = n - sum(INIT_CWND * MSS * 2**k for k in range(5))
    assert transfer_s(n, 400.0, 40.0) == pytest.approx(0.040 + 5 * 0.040 + left / payload_rate(400.0))
    assert slow_start_s(n, 400.0, 40.0) == pytest.approx(transfer_s(n, 400.0, 40.0) - 0.040
                                                         - n / payload_rate(400.0))
    assert 0.18 < slow_start_s(n, 400.0, 40.0) < 0.2


def test_no_slow_start_without_delay_or_bytes_or_rate_limit() -> None:
    assert slow_start_s(590_000, 400.0, 0.0) == 0.0
    assert slow_start_s(0, 400.0, 40.0) == 0.0
    assert slow_start_s(590_000, float("inf"), 40.0) == 0.0


def test_loss_bounds_a_flow_by_the_square_root_of_the_loss_rate() -> None:
    from testbed.net.tcp_model import MTU, loss_limited_mbit

    # 1 % loss, 50 ms: 1448 B / 50 ms * 1.22 / 0.1 = 354.7 KB/s of payload, 2.94 Mbit/s of IP packets
    assert loss_limited_mbit(1.0, 50.0) == pytest.approx(1448 / 0.05 * 1.5 ** 0.5 / 0.1 * 8 / 1e6 * MTU / MSS)
    assert loss_limited_mbit(1.0, 50.0) == pytest.approx(2.94, abs=0.01)
    assert loss_limited_mbit(0.25, 50.0) == pytest.approx(2 * loss_limited_mbit(1.0, 50.0))
    assert loss_limited_mbit(1.0, 100.0) == pytest.approx(loss_limited_mbit(1.0, 50.0) / 2)
    assert loss_limited_mbit(0.0, 50.0) is None and loss_limited_mbit(1.0, 0.0) is None
