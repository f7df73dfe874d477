"""The shaping interface without a network: both backends are ``Shaper``s, the kernel's queue
and ordering settings follow the semantics table."""

from __future__ import annotations

import pytest

from testbed.net.shaping import Shaper, kernel, make_shaper
from testbed.spec.options import SHAPERS
from testbed.spec.topology import Shaping


@pytest.mark.parametrize("name", [s for s in SHAPERS if s != "auto"])
def test_every_backend_is_a_shaper(name: str):
    backend = make_shaper(name, netem=False)
    assert isinstance(backend, Shaper)
    assert backend.name == name
    backend.close()


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown shaping backend 'tc'"):
        make_shaper("tc")


def test_netem_limit_is_the_rate_queue_plus_the_packets_in_delay():
    # 1000 Mbit/s x 25 ms = 3.125 MB = 2084 full-size packets in flight, plus the default queue
    assert kernel.netem_limit(None, 1000, 25, 0) == 1000 + 2084
    assert kernel.netem_limit(20, 10, 50, 0) == 20 + 42
    assert kernel.netem_limit(20, 10, 40, 10) == 20 + 42  # jitter can hold packets longer
    assert kernel.netem_limit(20, 10, 0, 0) == 20
    # no rate: room for the delay at 10 Gbit/s
    assert kernel.netem_limit(None, None, 1, 0) == 1000 + 834


def test_netem_keeps_order_only_when_jitter_could_break_it():
    with_jitter = kernel._netem_args(Shaping(delay_ms=10, jitter_ms=5), 10, 10, 0)
    assert with_jitter["rate"] == kernel.ORDER_RATE and with_jitter["jitter"] == 5000
    assert "rate" not in kernel._netem_args(Shaping(delay_ms=10), 10, 10, 0)
