"""The pipeline model against a hand-traced timeline, known closed forms and the discrete-event run."""

from __future__ import annotations

import random

import pytest

from testbed.apps.training.analytic import (
    SCHEDULES,
    Hop,
    Stage,
    bubble_fraction,
    peak_micro_batches,
    predict,
    schedule_ops,
    simulate,
    simulate_clients,
    simulated_peaks,
)


def hop_ms(fwd_ms: float, bwd_ms: float, latency_ms: float = 0.0, rate: float = 1e9) -> Hop:
    """A hop whose serialization takes the given times at ``rate``."""
    return Hop(round(fwd_ms * rate / 8e3), round(bwd_ms * rate / 8e3), rate, latency_ms)


def random_hop(rng: random.Random) -> Hop:
    return hop_ms(rng.uniform(0, 30), rng.uniform(0, 30), rng.choice([0, 1, 5, 20]))


def test_hand_traced_two_stages() -> None:
    """P=2, M=2, f=(1,3), b=(2,4), link 0.5 ms forward / 0.25 ms back + 1 ms latency, traced on paper:
    stage 1 ends its forwards at 8.5 (GPipe) and stage 0's last backward ends at 19.75 in both schedules."""
    stages = [Stage(1, 2, activation_bytes=100), Stage(3, 4, activation_bytes=10, update_ms=0.5)]
    hops = [hop_ms(0.5, 0.25, 1.0)]
    for schedule in SCHEDULES:
        for model in (predict, simulate):
            r = model(stages, hops, 2, schedule)
            assert r.step_ms == pytest.approx(19.75), (schedule, model.__name__)
            assert r.stages[1].idle_ms == pytest.approx(19.75 - 14 - 0.5)
            assert r.hop_transfer_ms[0] == pytest.approx((1.0, 0.5))
    assert simulate(stages, hops, 2, "gpipe").stages[1].peak_activation_bytes == 20
    assert simulate(stages, hops, 2, "1f1b").stages[1].peak_activation_bytes == 10
    late = [Stage(1, 2, update_ms=0.5), Stage(3, 4)]  # the device's optimizer step ends the step
    assert simulate(late, hops, 2, "gpipe").step_ms == pytest.approx(20.25)
    assert predict(late, hops, 2, "1f1b").step_ms == pytest.approx(20.25)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("p", "m"), [(1, 1), (1, 8), (2, 1), (2, 4), (3, 8), (4, 2), (4, 8), (5, 16)])
def test_equal_stages_match_the_textbook_bubble(schedule: str, p: int, m: int) -> None:
    f, b = 3.0, 5.0
    stages = [Stage(f, b)] * p
    hops = [Hop(0, 0, 1e9)] * (p - 1)  # free links
    for model in (predict, simulate):
        r = model(stages, hops, m, schedule)
        assert r.step_ms == pytest.approx((m + p - 1) * (f + b), rel=1e-9)
        assert r.bubble_fraction == pytest.approx(bubble_fraction(p, m), rel=1e-9, abs=1e-12)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)


def test_gpipe_closed_form_is_exact_for_any_stages_and_links() -> None:
    rng = random.Random(0)
    for _ in range(300):
        p, m = rng.randint(1, 5), rng.choice([1, 2, 3, 4, 8, 16])
        stages = [Stage(rng.uniform(0.5, 20), rng.uniform(0.5, 40), update_ms=rng.uniform(0, 3))
                  for _ in range(p)]
        hops = [random_hop(rng) for _ in range(p - 1)]
        a, s = predict(stages, hops, m, "gpipe"), simulate(stages, hops, m, "gpipe")
        assert a.step_ms == pytest.approx(s.step_ms, rel=1e-9)
        idle = [t.idle_ms for t in s.stages]
        assert [t.idle_ms for t in a.stages] == pytest.approx(idle, rel=1e-9, abs=1e-9)


def test_1f1b_model_is_a_close_lower_bound() -> None:
    """The 1F1B closed form follows real dependency chains: never above the event run, and close to it."""
    rng = random.Random(1)
    errors = []
    for _ in range(400):
        p, m = rng.randint(1, 5), rng.choice([1, 2, 4, 8, 16])
        stages = [Stage(rng.uniform(5, 20), rng.uniform(10, 40)) for _ in range(p)]
        hops = [random_hop(rng) for _ in range(p - 1)]
        a, s = predict(stages, hops, m, "1f1b").step_ms, simulate(stages, hops, m, "1f1b").step_ms
        assert a <= s * (1 + 1e-9)
        errors.append((s - a) / s)
    errors.sort()
    assert errors[-1] < 0.15 and errors[int(0.9 * len(errors))] < 0.07


def test_link_bound_pipeline() -> None:
    """A slow link is the bottleneck server: GPipe's forward wave advances one transfer per micro-batch."""
    stages = [Stage(1, 1), Stage(1, 1)]
    hops = [hop_ms(10, 0)]
    for m in (1, 4, 8):
        expect = (1 + 10 + 1 + (m - 1) * 10) + (1 + 1 + (m - 1) * 1)
        assert predict(stages, hops, m, "gpipe").step_ms == pytest.approx(expect)
        assert simulate(stages, hops, m, "gpipe").step_ms == pytest.approx(expect)
        assert simulate(stages, hops, m, "1f1b").step_ms >= 10 * m  # the link carries every micro-batch


def test_1f1b_order_and_peak_memory() -> None:
    assert schedule_ops(0, 4, 6, "1f1b") == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0), ("F", 4),
                                             ("B", 1), ("F", 5), ("B", 2), ("B", 3), ("B", 4), ("B", 5)]
    assert schedule_ops(3, 4, 3, "1f1b") == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert schedule_ops(1, 2, 2, "gpipe") == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    for p in range(1, 7):
        for m in range(1, 11):
            for schedule in SCHEDULES:
                peaks = simulated_peaks(p, m, schedule)
                assert peaks == [peak_micro_batches(s, p, m, schedule) for s in range(p)]
            gp, ob = simulated_peaks(p, m, "gpipe"), simulated_peaks(p, m, "1f1b")
            if m > p:  # the memory criterion, per stage
                assert all(o <= (p / m) * g * 1.1 for o, g in zip(ob, gp, strict=True))
    stages = [Stage(1, 1, activation_bytes=1000)] * 4
    r = simulate(stages, [Hop(1, 1, 1e9)] * 3, 8, "1f1b")
    assert [t.peak_activation_bytes for t in r.stages] == [4000, 3000, 2000, 1000]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="schedule must be one of gpipe, 1f1b"):
        predict([Stage(1, 1)], [], 2, "interleaved")
    with pytest.raises(ValueError, match="2 stages need 1 hops, got 0"):
        simulate([Stage(1, 1)] * 2, [], 2, "gpipe")
    with pytest.raises(ValueError, match="at least one"):
        predict([Stage(1, 1)], [], 0, "gpipe")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("m", [1, 4])
def test_a_cold_link_costs_each_wave_its_first_message_once(schedule: str, m: int) -> None:
    """Slow start after idle: the first message of each wave, each way, pays its restart.  With one
    micro-batch every message is a first one and both the closed form and the op-by-op simulation add
    every restart; with more, the simulation lets the slack of later micro-batches absorb part of it
    and the closed form counts it whole (never less than the simulation)."""
    stages = [Stage(30.0, 60.0), Stage(50.0, 90.0), Stage(40.0, 70.0)]
    warm = [Hop(200_000, 200_000, 100e6, 10.0), Hop(200_000, 200_000, 100e6, 5.0)]
    cold = [Hop(h.forward_bytes, h.backward_bytes, h.rate_bps, h.latency_ms, forward_restart_ms=25.0,
                backward_restart_ms=15.0) for h in warm]
    extra = {fn.__name__: fn(stages, cold, m, schedule).step_ms - fn(stages, warm, m, schedule).step_ms
             for fn in (predict, simulate)}
    if m == 1:
        assert extra["predict"] == pytest.approx(80.0) and extra["simulate"] == pytest.approx(80.0)
    else:
        assert 0 < extra["simulate"] <= extra["predict"] + 1e-9 <= 80.0 + 1e-9, extra


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("servers", "m", "steps"), [(1, 1, 1), (1, 4, 3), (2, 2, 2), (3, 8, 2)])
def test_one_device_over_steps_is_steps_of_the_one_step_model(schedule: str, servers: int, m: int,
                                                              steps: int) -> None:
    """With one device nothing overlaps across steps: the device's update ends each step."""
    rng = random.Random(servers * 100 + m)
    stages = [Stage(rng.uniform(1, 10), rng.uniform(1, 10)) for _ in range(servers + 1)]
    hops = [Hop(h.forward_bytes, h.backward_bytes, h.rate_bps, h.latency_ms, rng.uniform(0, 5),
                rng.uniform(0, 5)) for h in (random_hop(rng) for _ in range(servers))]
    one = simulate(stages, hops, m, schedule).step_ms
    assert simulate_clients(stages[:1], hops[:1], stages[1:], hops[1:], m, schedule, steps) \
        == pytest.approx(one, rel=1e-12)


def test_parallel_devices_hand_traced() -> None:
    """Two devices (forward 1, backward 1), one server (3 and 3 a device's micro-batch), free links.
    Step 0: the server's F0 1-4, F1 4-7, B0 7-10, B1 10-13; device 0 ends at 11, device 1 at 14.
    Device 0 starts step 1 at once: its F 11-12, so the server's step 1 starts when it is free (13):
    F0 13-16, F1 16-19, B0 19-22, B1 22-25, device 1's backward 25-26: 26 for two steps, where steps
    run one after another take 14 each."""
    dev, srv, free = Stage(1, 1), Stage(3, 3), hop_ms(0, 0)
    assert simulate_clients([dev, dev], [free, free], [srv], [], 1, "gpipe", 2) == pytest.approx(13.0)
    assert simulate_clients([dev, dev], [free, free], [srv], [], 1, "gpipe", 1) == pytest.approx(14.0)
    # FedAvg every step, 2 ms: step 0 ends for both at 14 + 2; step 1 from 16 as step 0 from 0
    assert simulate_clients([dev, dev], [free, free], [srv], [], 1, "gpipe", 2, 1, 2.0) == pytest.approx(16.0)
    # every second step: step 0 overlaps as without it, step 1 ends with the exchange (26 + 2)
    assert simulate_clients([dev, dev], [free, free], [srv], [], 1, "gpipe", 2, 2, 2.0) == pytest.approx(14.0)
    # 1F1B on the server (F0 1-4, B0 4-7, F1 7-10, B1 10-13): one step as long as with GPipe
    assert simulate_clients([dev, dev], [free, free], [srv], [], 1, "1f1b", 1) == pytest.approx(14.0)


def test_a_slow_device_link_hides_behind_the_server_work_for_the_other() -> None:
    """Device 1's link takes 5 ms each way; the server works on device 0's micro-batch meanwhile:
    F0 1-4, F1 6-9 (arrived at 6), B0 9-12, B1 12-15, back over the slow link at 20, backward 20-21."""
    dev, srv = Stage(1, 1), Stage(3, 3)
    assert simulate_clients([dev, dev], [hop_ms(0, 0), hop_ms(5, 5)], [srv], [], 1, "gpipe", 1) \
        == pytest.approx(21.0)
    with pytest.raises(ValueError, match="a link per device"):
        simulate_clients([dev, dev], [hop_ms(0, 0)], [srv], [], 1, "gpipe", 1)
