"""Results as rows for plots and tables: one row per point, its repeats summarized.

A figure measured once per repeat (TTFT, end-to-end time, mean per-token latency, bytes)
is shown as the median over the successful repeats with their range (min-max): with the
handful of repeats a suite runs, a 95% interval would claim more than the data hold.
Token-latency percentiles pool every decode step of every session of every repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testbed.experiments.metrics import pooled_token_latency
from testbed.experiments.points import label_value
from testbed.experiments.results import read_results

SPREAD = "median (min–max over repeats)"  # what a table cell and an error bar show
SPREAD_SHORT = "median (min–max)"  # the same, in a table header


@dataclass(frozen=True)
class Spread:
    """Median and range of one figure over the repeats of a point."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        if not values:
            return None
        a = np.asarray(values, dtype=float)
        return cls(float(np.median(a)), float(a.min()), float(a.max()), int(a.size))

    def scaled(self, k: float) -> Spread:
        return Spread(self.median * k, self.lo * k, self.hi * k, self.n)


def cell(s: Spread | None, fmt: str = "{:.1f}") -> str:
    """A summary table's cell: the median, with the range where the repeats differ; ``-`` if none."""
    if s is None:
        return "-"
    if s.n < 2 or s.lo == s.hi:
        return fmt.format(s.median)
    return f"{fmt.format(s.median)} ({fmt.format(s.lo)}–{fmt.format(s.hi)})"


@dataclass
class Row:
    point: str
    placement_name: str
    kind: str
    params: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") == "ok"]

    def values(self, *path: str) -> list[float]:
        """``metrics.<path>`` of each successful repeat that measured it."""
        vals = []
        for r in self.ok:
            v: Any = r["metrics"]
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                vals.append(float(v))
        return vals

    def spread(self, *path: str) -> Spread | None:
        """Median and range over the successful repeats of ``metrics.<path>`` (None if never measured)."""
        return Spread.of(self.values(*path))

    def median(self, *path: str) -> float | None:
        s = self.spread(*path)
        return None if s is None else s.median

    def token_latency(self) -> dict[str, Any]:
        """Per-token (decode) latency statistics over every token of every session and repeat."""
        return pooled_token_latency(self.ok)

    def kv_bytes(self, device_only: bool = False) -> Spread | None:
        """KV-cache bytes held at the end of the request: all shards, or the device's shard only."""
        hops = [r["metrics"]["per_hop"][: 1 if device_only else None] for r in self.ok]
        return Spread.of([sum(h.get("kv_cache_bytes", 0) or 0 for h in hs) for hs in hops])

    def label(self, skip: tuple[str, ...] = ()) -> str:
        """The placement plus the non-skipped swept parameters, e.g. ``split cut=2 int8``."""
        rec = self.records[0]
        swept = rec.get("swept") or []
        shown = rec.get("labels") or {}  # as the point id shows them (disambiguated file names)
        parts = [self.placement_name]
        for k in swept:
            if k in skip or k not in self.params:
                continue
            v = self.params[k]
            parts.append(str(v) if k == "codec" else f"{k}={shown.get(k) or label_value(v)}")
        return " ".join(parts)


REQUIRED = ("placement_name", "kind", "params")


def load_rows(out_dir: Path, warn: Callable[[str], None] | None = None
              ) -> tuple[list[Row], list[dict[str, Any]]]:
    """Rows in first-seen order, and all usable records; ``warn`` hears of each skipped line."""
    path = out_dir / "results.jsonl"
    found, problems = read_results(path)
    records = []
    for r in found:
        missing = [k for k in REQUIRED if k not in r]
        if r.get("status") == "ok" and not isinstance(r.get("metrics"), dict):
            missing.append("metrics")
        if missing:
            problems.append(f"{path}: skipped the record of {r['point']} repeat {r['repeat']} "
                            f"(no {', '.join(missing)})")
            continue
        records.append(r)
    for line in problems:
        if warn:
            warn(line)
    rows: dict[str, Row] = {}
    for r in records:
        row = rows.setdefault(r["point"], Row(r["point"], r["placement_name"], r["kind"], r["params"]))
        row.records.append(r)
        if r.get("status") != "ok":
            row.errors.append(r.get("error", "unknown error"))
    return list(rows.values()), records
