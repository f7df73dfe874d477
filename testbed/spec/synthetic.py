"""Synthetic channel traces from a Gilbert-Elliott (two-state Markov-modulated) channel.

Time is cut into bins (100 ms by default).  The channel is in a *good* or a *bad*
state, each with its own rate (and, for CSV output, delay and loss); at the end of
every bin it moves good -> bad with probability ``p_good_bad`` and bad -> good with
``p_bad_good``.  It starts in the good state.  A given seed always yields the same trace.

Writers:

* mahimahi: packets are placed by cumulative credit at each bin's rate and stamped
  with the (ceiled) integer millisecond; the file always ends with a stamp equal to
  the duration, so the trace's period is exactly ``seconds``.
* csv: one row per state change, plus rows one bin and two bins before the end, so
  that the CSV period rule (last time + previous interval) gives exactly ``seconds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testbed.spec.traces import MBIT_MS_PER_PACKET


@dataclass(frozen=True)
class GilbertElliott:
    """Two-state Markov channel; probabilities are per bin."""

    good_mbit: float = 20.0
    bad_mbit: float = 2.0
    p_good_bad: float = 0.05
    p_bad_good: float = 0.2
    bin_ms: float = 100.0
    good_delay_ms: float | None = None
    bad_delay_ms: float | None = None
    good_loss_pct: float | None = None
    bad_loss_pct: float | None = None

    def stationary_good(self) -> float:
        """Long-run share of time in the good state."""
        total = self.p_good_bad + self.p_bad_good
        return 1.0 if total == 0 else self.p_bad_good / total

    def stationary_mean_mbit(self) -> float:
        pi = self.stationary_good()
        return pi * self.good_mbit + (1 - pi) * self.bad_mbit

    def states(self, seconds: float, seed: int) -> np.ndarray:
        """Per-bin state for ``seconds`` (True = good), deterministic in ``seed``."""
        n = max(1, round(seconds * 1000.0 / self.bin_ms))
        draws = np.random.default_rng(seed).random(n)
        good = np.empty(n, dtype=bool)
        state = True
        for i in range(n):
            good[i] = state
            state = draws[i] >= self.p_good_bad if state else draws[i] < self.p_bad_good
        return good

    def rates_mbit(self, states: np.ndarray) -> np.ndarray:
        return np.where(states, self.good_mbit, self.bad_mbit).astype(np.float64)


def mahimahi_stamps(rates_mbit: np.ndarray, bin_ms: float) -> np.ndarray:
    """Integer ms delivery stamps for per-bin rates; the last stamp is the total duration."""
    duration = len(rates_mbit) * bin_ms
    credit = np.concatenate([[0.0], np.cumsum(rates_mbit * bin_ms / MBIT_MS_PER_PACKET)])
    total = int(math.floor(credit[-1] + 1e-9))
    n = np.arange(1, total + 1, dtype=np.float64)
    k = np.clip(np.searchsorted(credit, n - 1e-9, side="left") - 1, 0, len(rates_mbit) - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = k * bin_ms + (n - credit[k]) * MBIT_MS_PER_PACKET / rates_mbit[k]
    stamps = np.ceil(np.minimum(t, duration) - 1e-6).astype(np.int64)
    end = int(round(duration))
    if stamps.size == 0 or stamps[-1] != end:
        stamps = np.append(stamps, end)
    return stamps


CsvRow = tuple[float, float, float | None, float | None]


def csv_rows(model: GilbertElliott, states: np.ndarray) -> list[CsvRow]:
    """``(time_s, bw_mbit, delay_ms, loss_pct)`` rows at state changes and the two last bins."""
    n = len(states)
    keep = {0, max(n - 2, 0), n - 1}
    keep.update(int(i) for i in np.flatnonzero(states[1:] != states[:-1]) + 1)
    rows = []
    for i in sorted(keep):
        good = bool(states[i])
        rows.append((
            round(i * model.bin_ms / 1000.0, 6),
            model.good_mbit if good else model.bad_mbit,
            model.good_delay_ms if good else model.bad_delay_ms,
            model.good_loss_pct if good else model.bad_loss_pct,
        ))
    return rows


def write_trace(path: Path, model: GilbertElliott, seconds: float, seed: int,
                fmt: str = "mahimahi") -> np.ndarray:
    """Write a trace file; returns the per-bin rates (Mbit/s) it encodes."""
    states = model.states(seconds, seed)
    rates = model.rates_mbit(states)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "mahimahi":
        stamps = mahimahi_stamps(rates, model.bin_ms)
        path.write_text("\n".join(map(str, stamps.tolist())) + "\n")
    elif fmt == "csv":
        rows = csv_rows(model, states)
        with_extra = any(r[2] is not None or r[3] is not None for r in rows)
        header = "time_s,bw_mbit,delay_ms,loss_pct" if with_extra else "time_s,bw_mbit"
        lines = [header]
        for t, bw, delay, loss in rows:
            cells = [f"{t:g}", f"{bw:g}"]
            if with_extra:
                cells += ["" if delay is None else f"{delay:g}", "" if loss is None else f"{loss:g}"]
            lines.append(",".join(cells))
        path.write_text("\n".join(lines) + "\n")
    else:
        raise ValueError(f"unknown trace format {fmt!r}")
    return rates
