"""The training prediction's network figures: routed paths through a cell, devices sharing what
their paths share, sfl's FedAvg exchange on top of the step, and devices in parallel overlapping
the server's work."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.apps.training.placement import Stage
from testbed.apps.training.run import TrainOptions, _own_paths, _paths, adapter_exchange_ms, predict_step_ms
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


def test_each_device_alone_gets_its_fair_share_of_what_its_path_shares() -> None:
    edge = loss_limited_mbit(1.0, 50.0) * 1e6
    assert _own_paths(CELL, ["dev1"], "mec") == [pytest.approx((10e6, 40e6, 15.0, 30.0))]
    four = _own_paths(CELL, ["dev1", "dev2", "dev3", "dev4"], "mec")
    # the backhaul down (100 Mbit/s) a quarter each: 25 bounds dev1 (40 on its radio link); dev3's
    # radio link (20 down) bounds it; up, the radio links (10, and TCP's bound on the lossy 5)
    assert four[0] == pytest.approx((10e6, 25e6, 15.0, 30.0))
    assert four[2] == pytest.approx((edge, 20e6, 25.0, 50.0))
    assert _own_paths(None, ["dev1", "dev2"], "mec")[1][2:] == (0.0, 0.0)


def _hops(devices: int, server_ms: float) -> tuple[list[dict], list[dict]]:
    """A device's forward/backward 100 ms; the server's per device ``server_ms`` each way; 600 kB
    activations and gradients a device (per_hop as a several-device record has it)."""
    dev = {"fwd_ms": 100.0, "bwd_ms": 100.0}
    per_hop = [dev, {"fwd_ms": server_ms * devices, "bwd_ms": server_ms * devices,
                     "bytes_up_per_step": 600_000.0 * devices, "bytes_down_per_step": 600_000.0 * devices}]
    per_client = [{"node": f"dev{i + 1}", "device": dev, "bytes_up_per_step": 600_000.0,
                   "bytes_down_per_step": 600_000.0} for i in range(devices)]
    return per_hop, per_client


@pytest.mark.parametrize("devices", [2, 4])
def test_parallel_devices_overlap_the_server_and_fedavg_holds_them(devices: int) -> None:
    names = [f"dev{i + 1}" for i in range(devices)]
    stages = [Stage(names[0], 0, 4), Stage("mec", 4, 30)]
    server_ms = 1000.0
    per_hop, per_client = _hops(devices, server_ms)
    psl = TrainOptions(scheme="psl", clients=names, steps=8)
    one_by_one = predict_step_ms(per_hop, stages, TrainOptions(clients=names[:1], steps=8), CELL)
    p = predict_step_ms(per_hop, stages, psl, CELL, 0.0, per_client)
    # the server is busy all the step but for a device's own way round; no faster than that
    busy = 2 * server_ms * devices
    assert busy < p < busy + one_by_one - 2 * server_ms
    # the devices' next forwards and uploads hide behind the server's work: less than the server's
    # work after one whole device cycle per step (what steps one after another would take)
    assert p < busy + (one_by_one - 2 * server_ms) * 0.9
    # without per_client: the first server's bytes shared out; the same figure here; likewise for a
    # device that failed (no figures of its own)
    assert predict_step_ms(per_hop, stages, psl, CELL) == pytest.approx(p)
    assert predict_step_ms(per_hop, stages, psl, CELL, 0.0, per_client[1:]) == pytest.approx(p)
    # sfl: FedAvg every step holds every device until all adapters are averaged
    a = 1_300_000.0
    sfl = TrainOptions(scheme="sfl", clients=names, steps=8)
    with_adapters = [{**c, "bytes_up_per_step": c["bytes_up_per_step"] + a,
                      "bytes_down_per_step": c["bytes_down_per_step"] + a} for c in per_client]
    p_sfl = predict_step_ms(per_hop, stages, sfl, CELL, a, with_adapters)
    exchange = adapter_exchange_ms(a, sfl, CELL, names, "mec")
    assert p_sfl >= p + exchange * 0.99
    every4 = TrainOptions(scheme="sfl", clients=names, steps=8, aggregate_every=4)
    assert p < predict_step_ms(per_hop, stages, every4, CELL, a, with_adapters) < p_sfl


def test_devices_taking_turns_each_use_their_own_path() -> None:
    """sl with several devices: a step is one device's alone, so the cell-edge devices (5 Mbit/s,
    lossy) make their steps slower than dev1's and dev2's, and no device gets the others' links."""
    names = ["dev1", "dev2", "dev3", "dev4"]
    stages = [Stage("dev1", 0, 4), Stage("mec", 4, 30)]
    per_hop, per_client = _hops(1, 1000.0)
    alone = {n: predict_step_ms(per_hop, [Stage(n, 0, 4), stages[1]], TrainOptions(clients=[n], steps=1),
                                CELL) for n in names}
    assert alone["dev3"] == alone["dev4"] > alone["dev1"] == alone["dev2"]
    turns = TrainOptions(scheme="sl", clients=names, steps=8)
    four = [{**per_client[0], "node": n} for n in names]
    assert predict_step_ms(per_hop, stages, turns, CELL, 0.0, four) == pytest.approx(sum(alone.values()) / 4)
    # 6 steps: dev1 and dev2 take two turns each, dev3 and dev4 one
    six = TrainOptions(scheme="sl", clients=names, steps=6)
    want = (2 * alone["dev1"] + 2 * alone["dev2"] + alone["dev3"] + alone["dev4"]) / 6
    assert predict_step_ms(per_hop, stages, six, CELL, 0.0, four) == pytest.approx(want)
