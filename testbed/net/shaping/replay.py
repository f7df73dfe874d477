"""Trace replay for the kernel backend: one thread updates every traced interface each 100 ms.

Bin ``k`` after the start plays the trace's bin ``k + trace_start_s / 100 ms`` (looping), so a
direction with ``trace_start_s`` starts that far into the trace's clock.

The thread is supervised: an error (a netlink call refused, an interface gone) stops it and is
kept in ``error`` with the link it happened on, for the backend's ``check`` to report; it never
dies silently.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from testbed.net.shaping import kernel as kernel_shaping
from testbed.spec.topology import Shaping
from testbed.spec.traces import Trace

BIN_MS = 100
NICE = -10  # of the replay thread


@dataclass
class Replayed:
    """One shaped interface following a trace."""

    link: str  # the link's name, for errors
    pid: int | None  # namespace holder (None: root namespace)
    idx: int
    shaping: Shaping
    trace: Trace
    bins: np.ndarray
    netem: bool
    last: tuple | None = None  # the netem settings sent last (skip a change that changes nothing)

    @property
    def offset_bins(self) -> int:
        """The bins skipped at the start: replay begins at the shaping's ``trace_start_s``."""
        return start_bin(self.shaping)


def start_bin(s: Shaping) -> int:
    """The bin replay starts at: ``trace_start_s`` of the trace's clock, in whole bins."""
    return round(s.trace_start_s * 1000.0 / BIN_MS)


class TraceReplayer(threading.Thread):
    """Steps every registered interface through its trace's 100 ms bins, looping."""

    def __init__(self, sockets: kernel_shaping.NetlinkSockets | None = None) -> None:
        super().__init__(name="trace-replay", daemon=True)
        self.items: list[Replayed] = []
        self.sockets = sockets or kernel_shaping.NetlinkSockets()
        self._stop_event = threading.Event()
        # not ``_started``: threading.Thread keeps its own start event under that name
        self._clock_started = threading.Event()
        self._lock = threading.Lock()
        self.t0 = 0.0
        self.error: tuple[str, BaseException] | None = None  # (link, what went wrong)

    def start(self) -> None:
        """Start replaying; returns once bin 0 has begun (``t0`` is set)."""
        super().start()
        self._clock_started.wait(timeout=5)

    def add(self, link: str, pid: int | None, idx: int, shaping: Shaping, trace: Trace, netem: bool) -> None:
        with self._lock:
            self.items.append(Replayed(link, pid, idx, shaping, trace, trace.rate_bins_mbit(BIN_MS), netem))

    def drop(self, link: str) -> None:
        """Stop replaying on ``link`` (its shaping was removed)."""
        with self._lock:
            self.items = [it for it in self.items if it.link != link]

    def run(self) -> None:
        # rate changes must land on time even on a loaded machine (root may raise priority)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        current = "?"
        try:
            for it in self.items:  # sockets of this thread, made before the clock starts
                current = it.link
                self.sockets.get(it.pid)
            self._replay()
        except BaseException as e:  # noqa: BLE001 - kept for check(): the thread must not die silently
            link = getattr(e, "link", current)
            self.error = (link, e)
        finally:
            self._clock_started.set()
            self.sockets.close_mine()

    def _replay(self) -> None:
        self.t0 = time.monotonic()
        self._clock_started.set()
        k = 0
        while not self._stop_event.is_set():
            with self._lock:
                items = list(self.items)
            for it in items:
                try:
                    self._step(it, k)
                except Exception as e:
                    e.link = it.link  # type: ignore[attr-defined]
                    raise
            k += 1
            # sleep until the next bin boundary (no drift: boundaries are t0 + k * 100 ms)
            self._stop_event.wait(max(0.0, self.t0 + k * BIN_MS / 1000.0 - time.monotonic()))

    def _step(self, it: Replayed, k: int) -> None:
        ipr = self.sockets.get(it.pid)
        k += it.offset_bins
        rate = float(it.bins[k % len(it.bins)])
        kernel_shaping.set_rate(ipr, it.idx, rate)
        if it.netem and kernel_shaping.wants_netem(it.shaping):
            step = it.trace.step_at(k * BIN_MS / 1000.0)
            delay = it.shaping.delay_ms + ((step.delay_ms or 0.0) if step is not None else 0.0)
            loss = it.shaping.loss_pct + ((step.loss_pct or 0.0) if step is not None else 0.0)
            # the limit follows the rate: the configured queue stays the rate queue
            want = (delay, loss, kernel_shaping.netem_limit(it.shaping.queue_pkts, rate, delay,
                                                            it.shaping.jitter_ms))
            if want != it.last:
                kernel_shaping.set_netem(ipr, it.idx, it.shaping, delay, loss, rate_mbit=rate)
                it.last = want

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=2)
