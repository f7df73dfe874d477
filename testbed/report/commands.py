"""``testbed report DIR``: PNG plots and a Markdown summary of a results directory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from testbed.report import caching, plots, training
from testbed.report.data import load_rows
from testbed.report.summary import write_summary
from testbed.spec.errors import SpecError


def _stderr(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def make_report(out_dir: Path, warn: Callable[[str], None] = _stderr) -> tuple[Path, list[Path]]:
    """Write every applicable plot and ``summary.md`` into ``out_dir``; return (summary, plots).

    A line of ``results.jsonl`` that is not a record (torn, corrupt) is skipped with one
    ``warn`` line naming FILE:LINE; a file with no usable record at all is a ``SpecError``.
    """
    if not (out_dir / "results.jsonl").exists():
        raise SpecError(out_dir, "results.jsonl", "no results here (run `testbed run SUITE --out DIR` first)")
    skipped: list[str] = []
    rows, records = load_rows(out_dir, skipped.append)
    if not records:  # one line, not a warning per line and then an error
        what = "empty: no complete record"
        if skipped:
            what = f"no usable record ({len(skipped)} lines skipped, the first: {skipped[0]})"
        raise SpecError(out_dir / "results.jsonl", "records", what)
    for line in skipped:
        warn(line)
    if caching.is_caching(records):
        pngs = caching.plots(rows, out_dir)
        return caching.write_summary(out_dir, rows, records, pngs), pngs
    if training.is_training(records):
        pngs = training.plots(rows, out_dir)
        return training.write_summary(out_dir, rows, records, pngs), pngs
    ok = [r for r in records if r.get("status") == "ok"]
    band = tuple(ok[0]["config"].get("analytic_band", (0.5, 2.0))) if ok else (0.5, 2.0)
    made = [
        plots.latency_vs_uplink(rows, out_dir),
        plots.bytes_per_token(rows, out_dir),
        plots.kv_cache(rows, out_dir),
        plots.trace_timeline(rows, out_dir),
        plots.events_timeline(rows, out_dir),
        plots.devices(rows, out_dir),
        plots.measured_vs_predicted(rows, out_dir, band),
    ]
    pngs = [p for p in made if p is not None]
    return write_summary(out_dir, rows, records, pngs), pngs


def report(args: argparse.Namespace) -> int:
    summary, pngs = make_report(Path(args.dir))
    print(summary.read_text())
    print(f"wrote {summary} and {len(pngs)} plots: {', '.join(p.name for p in pngs)}")
    return 0
