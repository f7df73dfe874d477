"""The mark of tests that measure real traffic through real shaping: rates, delays, loss, timelines.

Such a figure depends on the machine as well as on the code.  On a virtual machine the
hypervisor decides when an idle vCPU wakes up, so every timer (the link process's release
times, HTB's watchdog) can run late while the machine reads idle, and rates read low however
right the shaping is; and while its host is busy elsewhere it takes CPU time from every vCPU that
wants it (here a one-process training step went from 1.3 s to 8.6 s with 33 % of the CPU time
stolen).  So each try of a measured test first waits (up to ``FIT_WAIT_S``) for a machine fit to
emulate: at most ``QUIET_BUSY_PCT`` of all CPU time busy over a second, 1 ms timers at most
``MAX_TIMER_LATE_US`` late (median), and at most ``MAX_STOLEN_PCT`` stolen while every core spins
for a second.  A machine that never gets there skips the try's test, with the readings as the
reason: what it measured would be the machine.

A try that fails runs again after a pause, at most ``FAILURES`` tries in all (a shaping bug
fails all of them).  Every try prints the machine's readings before it and its load during it,
and pytest shows them with a failure.
"""

from __future__ import annotations

import functools
import time
import traceback

import pytest

from testbed.hosts.machine_load import cpu_times, load_between, top_processes, wait_fit

QUIET_BUSY_PCT = 20.0  # an idle machine reads 1-3 %; one core of two busy reads 50 %
MAX_TIMER_LATE_US = 500.0  # an idle VM of the kind this project runs on: 90-150 us
MAX_STOLEN_PCT = 10.0  # every core busy: 0-3 % stolen on a quiet host, 10-33 % on a busy one
FIT_WAIT_S = 120.0
FAILURES = 3
PAUSE_S = 30.0  # between tries: a burst of load elsewhere passes


def _busiest() -> str:
    return ", ".join(f"{name}[{pid}] {pct:.0f} %" for name, pid, pct in top_processes()) or "none"


def MEASURED(test):  # noqa: N802 (used as a mark)
    @functools.wraps(test)
    def tries(*args, **kwargs):
        failed = ""  # an earlier try's failure, named in a skip that follows it
        for n in range(1, FAILURES + 1):
            fitness = wait_fit(QUIET_BUSY_PCT, MAX_TIMER_LATE_US, MAX_STOLEN_PCT, FIT_WAIT_S)
            if not fitness.fit:
                pytest.skip(f"try {n}: the machine was not fit to emulate links for {FIT_WAIT_S:.0f} s "
                            f"({fitness}; busiest processes: {_busiest()}){failed}")
            before = cpu_times()
            try:
                test(*args, **kwargs)
            except Exception as e:
                during = load_between(before, cpu_times())
                print(f"try {n} (machine before: {fitness}) failed; during it: {during}; "
                      f"busiest just after: {_busiest()}")
                if n == FAILURES:
                    raise
                traceback.print_exception(e, limit=-3)
                first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                failed = f"; try {n} had failed: {first}"
                time.sleep(PAUSE_S)
            else:
                during = load_between(before, cpu_times())
                print(f"try {n} passed (machine before: {fitness}; during: {during})")
                return

    return pytest.mark.measured(tries)
