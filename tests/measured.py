"""The mark of tests that measure real traffic through real shaping: rates, delays, loss, timelines.

Such a figure depends on the machine's load as well as on the code: a process that starves the link
process or iperf3 for a second moves it out of its tolerance.  A failed run is run again after a
pause (a burst of load elsewhere passes), at most twice; a shaping bug fails all three runs, and
each failure is printed in the rerun report."""

import pytest

MEASURED = pytest.mark.flaky(reruns=2, reruns_delay=15)
