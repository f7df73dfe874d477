"""The training prediction's network figures: routed paths through a cell, devices sharing what
their paths share, and sfl's FedAvg exchange on top of the step."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.apps.training.run import TrainOptions, _paths, adapter_exchange_ms
from testbed.net.tcp_model import loss_limited_mbit, payload_rate, slow_start_s, transfer_s
from testbed.spec.topology import load_topology

CELL = load_topology(Path(__file__).resolve().parents[3] / "topologies" / "cell-4.yaml")


def test_one_device_through_the_cell_gets_its_slowest_link() -> None:
    # dev1 -> cell1 (10 Mbit/s up, 10 ms) -> mec (50 Mbit/s, 5 ms); back 100 then 40 Mbit/s
    assert _paths(CELL, ["dev1"], "mec") == pytest.approx((10e6, 40e6, 15.0, 30.0))


def test_devices_of_one_cell_share_its_backhaul() -> None:
    # two devices: each radio link carries half the bytes (2 x 10 Mbit/s), the backhaul all (50)
    assert _paths(CELL, ["dev1", "dev2"], "mec") == pytest.approx((20e6, 80e6, 15.0, 30.0))
    # four: the two devices at the cell edge bound it: 5 Mbit/s radio links losing 1 % with a 50 ms
    # round trip, where TCP settles below the rate (a quarter of the bytes each at that rate); the
    # backhaul would allow 50; their 20 ms radio delays make the longest path
    up, down, delay, rtt = _paths(CELL, ["dev1", "dev2", "dev3", "dev4"], "mec")
    edge = loss_limited_mbit(1.0, 50.0)
    assert edge < 5
    assert (up, down, delay, rtt) == pytest.approx((4 * edge * 1e6, 80e6, 25.0, 50.0))
    # past the first server, one path: mec -> cloud at 200 Mbit/s, 25 ms each way
    assert _paths(CELL, ["mec"], "cloud") == pytest.approx((200e6, 200e6, 25.0, 50.0))
    assert _paths(None, ["dev1"], "mec")[2:] == (0.0, 0.0)


def test_fedavg_every_k_steps_and_nothing_for_turns() -> None:
    a = 400_000.0  # one device's adapters message
    two = ["dev1", "dev2"]
    sfl = adapter_exchange_ms(a, TrainOptions(scheme="sfl", clients=two, aggregate_every=1), CELL, two, "mec")
    # both devices' adapters up through the shared paths (20 Mbit/s together), the average back (80)
    want = (2 * a / payload_rate(20) + slow_start_s(a, 20, 30) + transfer_s(2 * a, 80, 30)) * 1e3
    assert sfl == pytest.approx(want)
    every3 = TrainOptions(scheme="sfl", clients=two, aggregate_every=3)
    assert adapter_exchange_ms(a, every3, CELL, two, "mec") == pytest.approx(sfl / 3)
    # sl: a device's step does not hold the handing on (the next device's pull waits out a whole turn)
    assert adapter_exchange_ms(a, TrainOptions(scheme="sl", clients=two), CELL, two, "mec") == 0.0
    assert adapter_exchange_ms(a, TrainOptions(scheme="psl", clients=two), CELL, two, "mec") == 0.0
    assert adapter_exchange_ms(a, TrainOptions(scheme="sfl"), CELL, ["dev1"], "mec") == 0.0  # one device
    assert adapter_exchange_ms(0.0, TrainOptions(scheme="sfl", clients=two), CELL, two, "mec") == 0.0
