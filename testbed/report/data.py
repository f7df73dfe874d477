"""Results as rows for plots and tables: one row per point, repeats averaged."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testbed.experiments.points import label_value
from testbed.experiments.results import read_records


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

    def mean(self, *path: str) -> float | None:
        """Mean over the successful repeats of ``metrics.<path>`` (None if never measured)."""
        vals = []
        for r in self.ok:
            v: Any = r["metrics"]
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                vals.append(float(v))
        return float(np.mean(vals)) if vals else None

    def kv_bytes(self, device_only: bool = False) -> float | None:
        """KV-cache bytes held at the end of the request: all shards, or the device's shard only."""
        hops = [r["metrics"]["per_hop"][: 1 if device_only else None] for r in self.ok]
        vals = [sum(h.get("kv_cache_bytes", 0) or 0 for h in hs) for hs in hops]
        return float(np.mean(vals)) if vals else None

    def label(self, skip: tuple[str, ...] = ()) -> str:
        """The placement plus the non-skipped swept parameters, e.g. ``split cut=2 int8``."""
        swept = self.records[0].get("swept") or []
        parts = [self.placement_name]
        for k in swept:
            if k in skip or k not in self.params:
                continue
            v = self.params[k]
            parts.append(str(v) if k == "codec" else f"{k}={label_value(v)}")
        return " ".join(parts)


def load_rows(out_dir: Path) -> tuple[list[Row], list[dict[str, Any]]]:
    """Rows in first-seen order, and all records."""
    records = read_records(out_dir / "results.jsonl")
    rows: dict[str, Row] = {}
    for r in records:
        row = rows.setdefault(r["point"], Row(r["point"], r["placement_name"], r["kind"], r["params"]))
        row.records.append(r)
        if r.get("status") != "ok":
            row.errors.append(r.get("error", "unknown error"))
    return list(rows.values()), records
