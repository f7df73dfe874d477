"""The step deadline and the early probe's time, from measured steps and the link's RTT."""

from __future__ import annotations

import pytest

from testbed.apps.inference.recovery import StepClock


def test_nothing_measured_waits_the_timeout_and_asks_nothing() -> None:
    clock = StepClock(timeout_s=30.0, rtt_ms=10.0)
    assert clock.deadline_s(1, False) == 30.0 and clock.ask_s(1, False) is None
    assert clock.deadline_s(40, True) == 30.0 and clock.ask_s(40, True) is None


def test_deadline_is_twice_the_recent_median_plus_one_rtt_and_the_probe_halfway() -> None:
    clock = StepClock(rtt_ms=10.0)
    for ms in (100.0, 120.0, 400.0):  # one stall does not move the median
        clock.observe(1, False, ms)
    assert clock.deadline_s(1, False) == pytest.approx((2 * 120 + 10) / 1e3)
    assert clock.ask_s(1, False) == pytest.approx((120 + 10 / 2) / 1e3)


def test_under_the_floor_too_the_probe_goes_halfway() -> None:
    clock = StepClock(floor_ms=50.0, rtt_ms=0.2)
    clock.observe(1, False, 5.0)
    assert clock.deadline_s(1, False) == pytest.approx(0.050)
    assert clock.ask_s(1, False) == pytest.approx(0.025)  # not 45 ms: a stall has 25 ms to pass


def test_a_re_prefill_waits_generously_and_asks_nothing() -> None:
    clock = StepClock(rtt_ms=10.0)
    clock.observe(40, True, 400.0)  # 10 ms a token
    assert clock.deadline_s(60, True) == pytest.approx((10 * 600 + 10) / 1e3 + 1.0)
    assert clock.ask_s(60, True) is None
