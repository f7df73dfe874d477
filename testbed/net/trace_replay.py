"""Trace replay for the kernel backend: one thread updates every traced HTB class each 100 ms."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
from pyroute2 import IPRoute

from testbed.net import kernel_shaping
from testbed.spec.topology import Shaping
from testbed.spec.traces import Trace

BIN_MS = 100


@dataclass
class Replayed:
    """One shaped interface following a trace."""

    ipr: IPRoute
    idx: int
    shaping: Shaping
    trace: Trace
    bins: np.ndarray
    netem: bool


class TraceReplayer(threading.Thread):
    """Steps every registered interface through its trace's 100 ms bins, looping."""

    def __init__(self) -> None:
        super().__init__(name="trace-replay", daemon=True)
        self.items: list[Replayed] = []
        self._stop_event = threading.Event()
        self.t0 = 0.0

    def add(self, ipr: IPRoute, idx: int, shaping: Shaping, trace: Trace, netem: bool) -> None:
        self.items.append(Replayed(ipr, idx, shaping, trace, trace.rate_bins_mbit(BIN_MS), netem))

    def run(self) -> None:
        self.t0 = time.monotonic()
        k = 0
        while not self._stop_event.is_set():
            for it in self.items:
                kernel_shaping.set_rate(it.ipr, it.idx, float(it.bins[k % len(it.bins)]))
                step = it.trace.step_at(k * BIN_MS / 1000.0)
                if it.netem and step is not None:
                    delay = it.shaping.delay_ms + (step.delay_ms or 0.0)
                    loss = it.shaping.loss_pct + (step.loss_pct or 0.0)
                    kernel_shaping.set_netem(it.ipr, it.idx, it.shaping, delay, loss)
            k += 1
            # sleep until the next bin boundary (no drift: boundaries are t0 + k * 100 ms)
            self._stop_event.wait(max(0.0, self.t0 + k * BIN_MS / 1000.0 - time.monotonic()))

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=2)
