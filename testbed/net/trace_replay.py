"""Trace replay for the kernel backend: one thread updates every traced HTB class each 100 ms."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
from pyroute2 import IPRoute

from testbed.net.shaping import kernel as kernel_shaping
from testbed.spec.topology import Shaping
from testbed.spec.traces import Trace

BIN_MS = 100
NICE = -10  # of the replay thread


@dataclass
class Replayed:
    """One shaped interface following a trace."""

    pid: int | None  # namespace holder (None: root namespace)
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
        self._started = threading.Event()
        self.t0 = 0.0

    def start(self) -> None:
        """Start replaying; returns once bin 0 has begun (``t0`` is set)."""
        super().start()
        self._started.wait(timeout=5)

    def add(self, pid: int | None, idx: int, shaping: Shaping, trace: Trace, netem: bool) -> None:
        self.items.append(Replayed(pid, idx, shaping, trace, trace.rate_bins_mbit(BIN_MS), netem))

    def run(self) -> None:
        # rate changes must land on time even on a loaded machine (root may raise priority)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        # netlink sockets are used by the thread that made them (pyroute2 binds them to it)
        iprs: dict[int | None, IPRoute] = {}
        for it in self.items:
            if it.pid not in iprs:
                iprs[it.pid] = kernel_shaping.open_ns(it.pid)
        try:
            self._replay(iprs)
        finally:
            for ipr in iprs.values():
                ipr.close()

    def _replay(self, iprs: dict[int | None, IPRoute]) -> None:
        self.t0 = time.monotonic()
        self._started.set()
        k = 0
        while not self._stop_event.is_set():
            for it in self.items:
                ipr = iprs[it.pid]
                kernel_shaping.set_rate(ipr, it.idx, float(it.bins[k % len(it.bins)]))
                step = it.trace.step_at(k * BIN_MS / 1000.0)
                if it.netem and step is not None:
                    delay = it.shaping.delay_ms + (step.delay_ms or 0.0)
                    loss = it.shaping.loss_pct + (step.loss_pct or 0.0)
                    kernel_shaping.set_netem(ipr, it.idx, it.shaping, delay, loss)
            k += 1
            # sleep until the next bin boundary (no drift: boundaries are t0 + k * 100 ms)
            self._stop_event.wait(max(0.0, self.t0 + k * BIN_MS / 1000.0 - time.monotonic()))

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=2)
