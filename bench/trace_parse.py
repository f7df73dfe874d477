"""Trace parsing speed: load_trace (numpy) vs a plain per-line Python parser, side by side.

Usage: .venv/bin/python bench/trace_parse.py [TRACE ...]
(default: the real Mahimahi traces in ../shared/traces/mahimahi).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from testbed.spec import traces

DEFAULT = sorted((Path(__file__).resolve().parents[2] / "shared/traces/mahimahi").glob("*-short.*"))


def naive(path: Path) -> tuple[int, int]:
    """The obvious parser: int() per line, checks in Python."""
    stamps: list[int] = []
    for line in path.read_text().splitlines():
        if line.strip():
            v = int(line)
            if stamps and v < stamps[-1]:
                raise ValueError("decreasing")
            stamps.append(v)
    offsets = sorted(s % stamps[-1] for s in stamps)
    return len(offsets), stamps[-1]


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        traces._parse_cached.cache_clear()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(paths: list[Path]) -> None:
    print(f"{'trace':28} {'lines':>8} {'load_trace ms':>14} {'naive ms':>9} {'speedup':>8} {'cached ms':>10}")
    for path in paths:
        t = traces.load_trace(path)
        assert naive(path) == (t.packets_per_period, int(t.period_ms))
        fast = best_of(lambda p=path: traces.load_trace(p))
        slow = best_of(lambda p=path: naive(p))
        traces.load_trace(path)
        t0 = time.perf_counter()
        traces.load_trace(path)
        cached = time.perf_counter() - t0
        print(f"{path.name:28} {t.packets_per_period:8d} {fast * 1e3:14.1f} {slow * 1e3:9.1f} "
              f"{slow / fast:7.1f}x {cached * 1e3:10.2f}")


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]] or DEFAULT)
