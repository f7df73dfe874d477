"""A thread that watches a running network's parts and reports the first failure.

It calls ``check`` (e.g. the shaping backend's) every ``interval`` seconds; the first
``NetworkError`` is kept (``failure``) and handed to every ``on_failure`` callback, then the
thread ends: one failure ends the run, so later ones are not news.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from testbed.net.errors import NetworkError

INTERVAL_S = 0.2


class Watchdog(threading.Thread):
    def __init__(self, check: Callable[[], None], interval: float = INTERVAL_S) -> None:
        super().__init__(name="network-watchdog", daemon=True)
        self._check = check
        self.interval = interval
        self.failure: NetworkError | None = None
        self.callbacks: list[Callable[[NetworkError], None]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self._check()
            except NetworkError as e:
                self.fail(e)
                return

    def fail(self, error: NetworkError) -> None:
        """Record ``error`` (the first one wins) and tell the callbacks."""
        if self.failure is not None or self._stop_event.is_set():
            return
        self.failure = error
        for cb in list(self.callbacks):
            cb(error)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2)
