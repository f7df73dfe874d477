"""Pipeline schedules: the order of forward (F) and backward (B) micro-batch passes on each stage.

Stage ``i`` of ``P`` (the device is stage 0) runs its list in order; a pass waits for its input
(activations from upstream, a gradient from downstream), other arrivals wait in buffers.

- ``gpipe``: every forward, then every backward: each stage holds the activations of all M
  micro-batches at once.
- ``1f1b`` (PipeDream-flush): ``P - i - 1`` warm-up forwards, then one forward and one backward in
  turn, then the remaining backwards: a stage holds at most ``P - i`` micro-batches.

Backwards run in micro-batch order in both, so gradients accumulate in the same order as in the
one-process reference.
"""

from __future__ import annotations

SCHEDULES = ("gpipe", "1f1b")

Op = tuple[str, int]  # ("F" | "B", micro-batch)


def stage_ops(schedule: str, stage: int, stages: int, micro_batches: int) -> list[Op]:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")
    if not 0 <= stage < stages or micro_batches < 1:
        raise ValueError(f"bad stage {stage} of {stages} or micro-batch count {micro_batches}")
    m = micro_batches
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warm = min(stages - stage - 1, m)
    ops: list[Op] = [("F", i) for i in range(warm)]
    f, b = warm, 0
    while f < m:
        ops += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    ops += [("B", i) for i in range(b, m)]
    return ops


def max_in_flight(ops: list[Op]) -> int:
    """The most micro-batches held between their forward and backward under ``ops``."""
    live = peak = 0
    for kind, _ in ops:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak
