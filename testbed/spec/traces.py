"""Channel traces: the time-varying capacity of a link direction, replayed by the shapers.

Two formats are read:

* **mahimahi** -- one line per 1500-byte delivery opportunity, an integer millisecond
  timestamp per line (non-decreasing); a timestamp repeated k times means k packets in
  that millisecond.  The trace loops and its period is the last timestamp (mahimahi's
  convention), so a file containing just ``1`` is one packet per ms = 12 Mbit/s.
  Opportunity offsets are the timestamps modulo the period (a stamp equal to the
  period is offset 0 of the next loop).

* **csv** -- rows ``time_s,bw_mbit[,delay_ms,loss_pct]`` with an optional header line;
  ``#`` starts a comment, an empty delay/loss cell means "unchanged fixed value".
  The first row must be at ``time_s = 0`` and times must increase strictly.  Each row
  holds until the next row's time.  Period: the last row holds as long as the interval
  before it (period = last time + (last time - previous time)); a single-row file has a
  period of 1 s.  The trace loops.  Delivery opportunities are derived from the rate
  steps: packets are placed evenly within each step at the step's rate, by cumulative
  credit across steps (so fractional packets carry over from one step to the next;
  a fraction left at the end of the period is dropped).

Capacity figures: for mahimahi they count opportunities; for CSV they integrate the
rate steps exactly (``rate_bins_mbit`` and ``capacity_mbit_per_s``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from testbed.spec import check
from testbed.spec.errors import SpecError
from testbed.spec.options import TRACE_FORMATS

MTU_BYTES = 1500
MBIT_MS_PER_PACKET = MTU_BYTES * 8 / 1000.0  # one packet per ms = 12 Mbit/s
FORMATS = TRACE_FORMATS
# a trace's rate may drop to 0 (an outage); its upper bound is a link's
TRACE_BW_MBIT = check.Range(ge=0, le=check.BW_MBIT.le, note=check.BW_MBIT.note)
# what one period may hold: the replay keeps every delivery opportunity of a period in memory (8 bytes
# each) and reports bin it in 100 ms steps; a longer or denser trace is a typo (ms for s), not a channel
MAX_PERIOD_MS = 7 * 86400 * 1000.0
MAX_OPPORTUNITIES = 10_000_000


@dataclass(frozen=True)
class TraceStep:
    """One CSV row: from ``t_s`` on, the rate is ``bw_mbit`` (delay/loss None = unchanged)."""

    t_s: float
    bw_mbit: float
    delay_ms: float | None = None
    loss_pct: float | None = None


@dataclass
class Trace:
    """A looping channel trace, in either format."""

    path: Path
    format: str
    period_ms: float
    opportunities_ms: np.ndarray
    steps: list[TraceStep] = field(default_factory=list)

    @property
    def packets_per_period(self) -> int:
        return int(self.opportunities_ms.size)

    def mean_mbit(self) -> float:
        """Mean capacity over one period, in Mbit/s."""
        if self.format == "csv":
            return self._csv_bits_until(self.period_ms) / self.period_ms / 1000.0
        return self.packets_per_period * MBIT_MS_PER_PACKET / self.period_ms

    def rate_bins_mbit(self, bin_ms: float = 100.0) -> np.ndarray:
        """Capacity (Mbit/s) in consecutive bins of ``bin_ms`` over one period (the last bin may be short)."""
        if bin_ms <= 0:
            raise ValueError("bin_ms must be > 0")
        n = max(1, math.ceil(self.period_ms / bin_ms - 1e-9))
        edges = np.minimum(np.arange(n + 1, dtype=np.float64) * bin_ms, self.period_ms)
        widths = np.diff(edges)
        if self.format == "csv":
            bits = np.diff(self._csv_bits_until(edges))
            return bits / widths / 1000.0
        counts = np.diff(np.searchsorted(self.opportunities_ms, edges, side="left"))
        counts[-1] += self.packets_per_period - counts.sum()
        return counts * MBIT_MS_PER_PACKET / widths

    def capacity_mbit_per_s(self, seconds: int, start_s: float = 0.0) -> list[float]:
        """Expected capacity (Mbit/s) in each of ``seconds`` one-second windows from ``start_s``, looping."""
        edges = (start_s + np.arange(seconds + 1, dtype=np.float64)) * 1000.0
        if self.format == "csv":
            bits = np.diff(self._csv_bits_until(edges))
            return [float(b) / 1e6 for b in bits]
        return [float(c) * MTU_BYTES * 8 / 1e6 for c in np.diff(self._packets_until(edges))]

    def step_at(self, t_s: float) -> TraceStep | None:
        """The CSV step in force at ``t_s`` (looping); None for mahimahi traces."""
        if not self.steps:
            return None
        t_ms = (t_s * 1000.0) % self.period_ms
        i = int(np.searchsorted(self._step_starts_ms, t_ms, side="right")) - 1
        return self.steps[max(i, 0)]

    # -- cumulative capacity -----------------------------------------------------------

    @functools.cached_property
    def _step_starts_ms(self) -> np.ndarray:
        return np.array([s.t_s * 1000.0 for s in self.steps])

    @functools.cached_property
    def _csv_cumulative(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step starts (with the period appended), rates, and bits carried before each start."""
        starts = np.append(self._step_starts_ms, self.period_ms)
        rates = np.array([s.bw_mbit for s in self.steps])  # Mbit/s == kbit/ms
        cum = np.concatenate([[0.0], np.cumsum(rates * np.diff(starts) * 1000.0)])
        return starts, rates, cum

    def _packets_until(self, t_ms: np.ndarray) -> np.ndarray:
        """Number of opportunities in [0, t_ms), looping."""
        loops = np.floor(t_ms / self.period_ms)
        rest = t_ms - loops * self.period_ms
        return loops * self.packets_per_period + np.searchsorted(self.opportunities_ms, rest, side="left")

    def _csv_bits_until(self, t_ms: np.ndarray | float) -> np.ndarray:
        """Bits the CSV rate steps carry in [0, t_ms), looping."""
        t = np.asarray(t_ms, dtype=np.float64)
        starts, rates, cum = self._csv_cumulative
        loops = np.floor(t / self.period_ms)
        rest = t - loops * self.period_ms
        i = np.clip(np.searchsorted(starts, rest, side="right") - 1, 0, len(rates) - 1)
        return loops * cum[-1] + cum[i] + rates[i] * (rest - starts[i]) * 1000.0


def infer_format(path: Path) -> str:
    """``.csv`` files are CSV traces, everything else is mahimahi."""
    return "csv" if path.suffix.lower() == ".csv" else "mahimahi"


def load_trace(path: Path, fmt: str | None = None, *, source: Path | None = None,
               field: str = "trace") -> Trace:
    """Read and check a trace file; errors name ``source`` (or the trace) and ``field``."""
    path = Path(path)
    where = source if source is not None else path
    fmt = fmt or infer_format(path)
    if fmt not in FORMATS:
        raise SpecError(where, field, f"unknown trace format {fmt!r} (expected one of {', '.join(FORMATS)})")
    data = check.read_input(path, source, field, "trace file")
    try:
        cached = _parse_cached(fmt, data)
    except _TraceLineError as e:
        msg = f"{path} line {e.line}: {e.message}" if e.line else f"{path}: {e.message}"
        raise SpecError(where, field, msg) from None
    return dataclasses.replace(cached, path=path.resolve(), steps=list(cached.steps))


class _TraceLineError(Exception):
    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@functools.lru_cache(maxsize=32)
def _parse_cached(fmt: str, data: bytes) -> Trace:
    """Parse once per distinct file content; the shared opportunity array is read-only."""
    trace = _parse_mahimahi(data) if fmt == "mahimahi" else _parse_csv(data)
    trace.opportunities_ms.setflags(write=False)
    return trace


def _parse_mahimahi(data: bytes) -> Trace:
    tokens = data.split()
    n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    if len(tokens) == n_lines and b"\r" not in data:
        numbers = None  # one token per line, no blank lines: token i is on line i + 1
    else:
        numbers = []
        for n, ln in enumerate(data.splitlines(), start=1):
            parts = ln.split()
            if len(parts) > 1:
                text = ln.decode(errors="replace")
                raise _TraceLineError(n, f"expected one timestamp per line (got {text!r})")
            if parts:
                numbers.append(n)
    try:
        stamps = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        line, text = _first_bad_line(data, _is_uint)
        raise _TraceLineError(line, f"expected an integer millisecond timestamp (got {text!r})") from None
    if stamps.size == 0:
        raise _TraceLineError(None, "no delivery opportunity (empty trace)")

    def lineno(i: int) -> int:
        return numbers[i] if numbers is not None else i + 1

    neg = np.flatnonzero(stamps < 0)
    if neg.size:
        raise _TraceLineError(lineno(int(neg[0])), f"timestamp must be >= 0 (got {stamps[neg[0]]})")
    back = np.flatnonzero(np.diff(stamps) < 0)
    if back.size:
        i = int(back[0]) + 1
        msg = f"timestamps must not decrease (got {stamps[i]} after {stamps[i - 1]})"
        raise _TraceLineError(lineno(i), msg)
    period = float(stamps[-1])
    if period <= 0:
        raise _TraceLineError(lineno(stamps.size - 1),
                              "no delivery opportunity: the last timestamp (the period) must be > 0 (got 0)")
    if period > MAX_PERIOD_MS:
        raise _TraceLineError(lineno(stamps.size - 1), f"the last timestamp (the period) must be <= "
                                                       f"{MAX_PERIOD_MS:.0f} ms (7 days) (got {stamps[-1]})")
    mean = stamps.size * MBIT_MS_PER_PACKET / period
    if mean > TRACE_BW_MBIT.le:
        bound = f"{TRACE_BW_MBIT.le:g} Mbit/s ({TRACE_BW_MBIT.note})"
        raise _TraceLineError(None, f"mean rate must be <= {bound} "
                                    f"(got {mean:g} Mbit/s: {stamps.size} packets in {period:g} ms)")
    # stamps are sorted, so only the trailing stamps equal to the period wrap (to offset 0)
    wrapped = int(stamps.size - np.searchsorted(stamps, stamps[-1], side="left"))
    offsets = np.concatenate([np.zeros(wrapped), stamps[: stamps.size - wrapped].astype(np.float64)])
    return Trace(path=Path(), format="mahimahi", period_ms=period, opportunities_ms=offsets)


def _parse_csv(data: bytes) -> Trace:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise _TraceLineError(None, "not a UTF-8 text file") from None
    steps: list[TraceStep] = []
    first_content = True
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        cells = [c.strip() for c in line.split(",")]
        if first_content and not _is_number(cells[0]):
            first_content = False  # header
            continue
        first_content = False
        steps.append(_csv_row(n, cells, steps))
    if not steps:
        raise _TraceLineError(None, "no delivery opportunity (no rows)")
    if len(steps) == 1:
        period = 1000.0
    else:
        period = (2 * steps[-1].t_s - steps[-2].t_s) * 1000.0
    if period > MAX_PERIOD_MS:
        raise _TraceLineError(None, f"the period must be <= {MAX_PERIOD_MS / 1000:.0f} s (7 days) "
                                    f"(got {period / 1000:g} s: the last time_s plus the step before it)")
    trace = Trace(path=Path(), format="csv", period_ms=period, opportunities_ms=np.empty(0), steps=steps)
    trace.opportunities_ms = _csv_opportunities(trace)
    if trace.opportunities_ms.size == 0:
        raise _TraceLineError(None, f"no delivery opportunity: less than one {MTU_BYTES}-byte packet "
                                    f"per period ({trace.mean_mbit():g} Mbit/s over {period:g} ms)")
    return trace


def _csv_row(n: int, cells: list[str], prev: list[TraceStep]) -> TraceStep:
    if not 2 <= len(cells) <= 4:
        raise _TraceLineError(n, f"expected time_s,bw_mbit[,delay_ms,loss_pct] (got {len(cells)} fields)")
    names = ("time_s", "bw_mbit", "delay_ms", "loss_pct")
    vals: list[float | None] = []
    for name, cell in zip(names, cells, strict=False):
        if cell == "" and name in ("delay_ms", "loss_pct"):
            vals.append(None)
            continue
        if not _is_number(cell) or not math.isfinite(float(cell)):
            raise _TraceLineError(n, f"{name} must be a number (got {cell!r})")
        vals.append(float(cell))
    vals += [None] * (4 - len(vals))
    t, bw, delay, loss = vals
    assert t is not None and bw is not None
    if not prev and t != 0:
        raise _TraceLineError(n, f"the first row must be at time_s 0 (got {t:g})")
    if prev and t <= prev[-1].t_s:
        raise _TraceLineError(n, f"time_s must increase (got {t:g} after {prev[-1].t_s:g})")
    for name, rng, v in (("bw_mbit", TRACE_BW_MBIT, bw), ("delay_ms", check.DELAY_MS, delay),
                         ("loss_pct", check.LOSS_PCT, loss)):
        problem = None if v is None else rng.violation(v)
        if problem:
            raise _TraceLineError(n, f"{name} {problem} (got {v:g})")
    return TraceStep(t_s=t, bw_mbit=bw, delay_ms=delay, loss_pct=loss)


def _csv_opportunities(trace: Trace) -> np.ndarray:
    """Packets placed by cumulative credit: packet n leaves when the carried bits reach n * 12000."""
    starts = np.array([s.t_s * 1000.0 for s in trace.steps])
    rates = np.array([s.bw_mbit for s in trace.steps])
    ends = np.append(starts[1:], trace.period_ms)
    credit = np.concatenate([[0.0], np.cumsum(rates * (ends - starts) / MBIT_MS_PER_PACKET)])
    total = int(math.floor(credit[-1] + 1e-9))
    if total == 0:
        return np.empty(0)
    if total > MAX_OPPORTUNITIES:
        raise _TraceLineError(None, f"more than {MAX_OPPORTUNITIES} delivery opportunities per period "
                                    f"(got {total}: {trace.period_ms / 1000:g} s of rate steps): "
                                    "shorten the trace or lower its rates")
    n = np.arange(1, total + 1, dtype=np.float64)
    k = np.clip(np.searchsorted(credit, n - 1e-9, side="left") - 1, 0, len(rates) - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = starts[k] + (n - credit[k]) * MBIT_MS_PER_PACKET / rates[k]
    return np.sort(np.mod(np.minimum(t, trace.period_ms), trace.period_ms))


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _is_uint(s: str) -> bool:
    return s.lstrip("-").isdigit()


def _first_bad_line(data: bytes, ok) -> tuple[int, str]:
    for i, ln in enumerate(data.splitlines(), start=1):
        for tok in ln.split():
            s = tok.decode(errors="replace")
            if not ok(s) or len(s.lstrip("-")) > 18:
                return i, s
    return 0, ""
