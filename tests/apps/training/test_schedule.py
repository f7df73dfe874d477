"""GPipe and 1F1B pass orders: valid pipelines, and 1F1B's bound on micro-batches held."""

from __future__ import annotations

import pytest

from testbed.apps.training.schedule import SCHEDULES, max_in_flight, stage_ops


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(("stages", "micro"), [(2, 1), (2, 4), (3, 2), (4, 8), (5, 3)])
def test_every_pass_once_backward_after_forward(schedule, stages, micro) -> None:
    for i in range(stages):
        ops = stage_ops(schedule, i, stages, micro)
        assert sorted(ops) == sorted([("F", m) for m in range(micro)] + [("B", m) for m in range(micro)])
        assert [m for k, m in ops if k == "B"] == list(range(micro))  # accumulation order of the reference
        for m in range(micro):
            assert ops.index(("F", m)) < ops.index(("B", m))


@pytest.mark.parametrize(("stages", "micro"), [(2, 4), (4, 8), (3, 3), (4, 2)])
def test_1f1b_holds_at_most_p_minus_i(stages, micro) -> None:
    for i in range(stages):
        assert max_in_flight(stage_ops("gpipe", i, stages, micro)) == micro
        assert max_in_flight(stage_ops("1f1b", i, stages, micro)) == min(stages - i, micro)


def test_last_stage_alternates_and_first_warms_up() -> None:
    assert stage_ops("1f1b", 2, 3, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert stage_ops("1f1b", 0, 3, 3) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1), ("B", 2)]


def test_refuses_unknown() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        stage_ops("zigzag", 0, 2, 2)
    with pytest.raises(ValueError):
        stage_ops("gpipe", 2, 2, 2)
