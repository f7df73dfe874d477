"""How busy this machine's CPUs are, read from ``/proc/stat`` (and ``/proc/PID/stat``).

A shaped link is emulated by processes that need the CPU (the userspace link process, the
kernel's softirqs, the traffic's own senders and receivers).  When something else takes the
CPUs, a virtual machine's hypervisor above all (*steal*: time a vCPU was runnable but not run),
measured rates read low however right the shaping is.  A measurement says how busy the machine
was while it ran, so that such a figure is read as the machine's, not the link's.

Busy time alone does not tell whether a machine can emulate a link now.  A hypervisor that is
slow to wake an idle vCPU makes every timer late (the link process's release times, HTB's
watchdog) while the machine reads idle: ``timer_late_us`` measures that lateness directly.  And
a hypervisor takes CPU time only from vCPUs that want it, so an idle machine reads nothing
stolen even while the host is too busy to give it its cores: ``stolen_when_busy`` asks for every
core for a moment and reads what was taken (0-3 % on a quiet host of this project's kind, 10-33 %
while it was busy elsewhere for minutes).
"""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU time of all CPUs in clock ticks: not idle, stolen, and in all."""

    busy: int
    steal: int
    total: int


@dataclass(frozen=True)
class Load:
    """Per cent of all CPUs' time between two readings: busy (steal included) and stolen."""

    busy_pct: float
    steal_pct: float

    def __str__(self) -> str:
        return f"{self.busy_pct:.0f} % busy ({self.steal_pct:.0f} % stolen by the hypervisor)"


def cpu_times() -> CpuTimes:
    """All CPUs' times now.  Busy is everything but idle and iowait; guest time is already in
    user time, so the first eight fields are all there is to add."""
    fields = [int(x) for x in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:9]]
    fields += [0] * (8 - len(fields))  # an old kernel without steal
    idle, iowait, steal = fields[3], fields[4], fields[7]
    total = sum(fields)
    return CpuTimes(busy=total - idle - iowait, steal=steal, total=total)


def load_between(a: CpuTimes, b: CpuTimes) -> Load:
    """The load between two readings (0 % if no tick passed)."""
    total = b.total - a.total
    if total <= 0:
        return Load(0.0, 0.0)
    return Load(100.0 * (b.busy - a.busy) / total, 100.0 * (b.steal - a.steal) / total)


def load_over(seconds: float) -> Load:
    """The load over the next ``seconds``."""
    a = cpu_times()
    time.sleep(seconds)
    return load_between(a, cpu_times())


def _process_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (command name, user + system ticks so far), for every process readable now."""
    out = {}
    for d in PROC.iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        name_end = text.rfind(")")
        rest = text[name_end + 2:].split()
        out[int(d.name)] = (text[text.find("(") + 1:name_end], int(rest[11]) + int(rest[12]))
    return out


def top_processes(seconds: float = 1.0, n: int = 5) -> list[tuple[str, int, float]]:
    """The ``n`` processes that used the most CPU over the next ``seconds``: (name, pid, % of one
    core), busiest first; those that used none are left out."""
    tick = os.sysconf("SC_CLK_TCK")
    a = _process_ticks()
    time.sleep(seconds)
    b = _process_ticks()
    used = [(name, pid, 100.0 * (ticks - a[pid][1]) / tick / seconds)
            for pid, (name, ticks) in b.items() if pid in a and ticks > a[pid][1]]
    return sorted(used, key=lambda u: -u[2])[:n]


def timer_late_us(n: int = 200, sleep_s: float = 0.001) -> float:
    """Median microseconds by which a ``sleep_s`` wait in ``select`` (the link process's own
    wait) overshoots, over ``n`` waits: 90-150 on an idle VM of the kind this project is developed
    and tested on."""
    late = []
    for _ in range(n):
        t = time.monotonic()
        select.select([], [], [], sleep_s)
        late.append(time.monotonic() - t - sleep_s)
    return statistics.median(late) * 1e6


SPIN = "import time\nt = time.monotonic() + {s}\nwhile time.monotonic() < t:\n    pass\n"


def stolen_when_busy(seconds: float = 1.0) -> float:
    """Per cent of all CPU time the hypervisor took while one process per core spun for ``seconds``
    (read over the middle of that time: the processes' start and end are not counted)."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN.format(s=seconds + 0.4)])
                for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.2)
        load = load_over(seconds)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    return load.steal_pct


@dataclass(frozen=True)
class Fitness:
    """Whether the machine can emulate links faithfully now, and the readings that say so."""

    fit: bool
    load: Load
    timer_late_us: float
    stolen_when_busy_pct: float

    def __str__(self) -> str:
        return (f"{self.load}, 1 ms timers {self.timer_late_us:.0f} us late (median), "
                f"{self.stolen_when_busy_pct:.0f} % stolen with every core busy")


def wait_fit(max_busy_pct: float, max_late_us: float, max_stolen_pct: float, timeout_s: float,
             window_s: float = 1.0) -> Fitness:
    """Wait, for at most ``timeout_s``, until a ``window_s`` reads at most ``max_busy_pct`` busy,
    timers right after it are at most ``max_late_us`` late and the hypervisor takes at most
    ``max_stolen_pct`` from every core busy (checked in that order, each only if the one before
    passed); the last readings either way (-1 for one not taken)."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = load_over(window_s)
        late = stolen = -1.0
        fit = load.busy_pct <= max_busy_pct
        if fit:
            late = timer_late_us()
            fit = late <= max_late_us
        if fit:
            stolen = stolen_when_busy()
            fit = stolen <= max_stolen_pct
        if fit or time.monotonic() >= deadline:
            return Fitness(fit, load, late, stolen)
