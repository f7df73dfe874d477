"""Figures and the summary of training suites (records with a ``training`` part).

Loss curves come from one repeat of a point (the first successful one: curves of different repeats
are not averaged step by step); step times, bytes and perplexities are medians over the repeats with
their range, as everywhere in the reports.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from testbed.report.data import SPREAD, SPREAD_SHORT, Row, Spread, cell  # noqa: E402
from testbed.report.plots import SPLIT_COLORS, _errorbar, _save  # noqa: E402


def is_training(records: list[dict[str, Any]]) -> bool:
    return any("training" in r for r in records)


def _rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.ok and "training" in r.ok[0]]


def _color(i: int) -> str:
    return SPLIT_COLORS[i % len(SPLIT_COLORS)]


def _curves(rows: list[Row], x_key: str, scale: float, xlabel: str, title: str, path: Path) -> Path | None:
    rows = _rows(rows)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(rows):
        t = r.ok[0]["training"]
        ax.plot([x * scale for x in t[x_key]], t["losses"], marker="o", markersize=3, color=_color(i),
                label=r.label())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss (per step)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def loss_vs_wallclock(rows: list[Row], out: Path) -> Path | None:
    """Training loss after each step against the time the steps took (the first repeat of each point)."""
    return _curves(rows, "wall_ms", 1e-3, "wall-clock of the training steps (s)",
                   "Loss vs wall-clock (first repeat of each point)", out / "train_loss_vs_time.png")


def loss_vs_bytes(rows: list[Row], out: Path) -> Path | None:
    """Training loss after each step against the bytes the device's link carried both ways so far."""
    return _curves(rows, "bytes_total", 1e-6, "bytes on the device's link, up + down (MB)",
                   "Loss vs bytes (first repeat of each point)", out / "train_loss_vs_bytes.png")


def step_vs_hops(rows: list[Row], out: Path) -> Path | None:
    """Measured step time vs the number of hops after the device, with the analytic prediction dashed;
    one line per schedule x micro-batches (x the other swept parameters)."""
    rows = _rows(rows)
    if not rows:
        return None
    lines: dict[str, list[tuple[float, Spread, Spread | None]]] = defaultdict(list)
    for r in rows:
        hops, meas = r.median("hops"), r.spread("step_ms_mean")
        if hops is None or meas is None:
            continue
        # the placement's name (hops1, hops2, ...) is the x axis: the line is the other parameters
        rest = " ".join(r.label(skip=("schedule", "micro_batches")).split(" ")[1:])
        lab = f"{r.params.get('schedule', '')} M={r.params.get('micro_batches', 1)} {rest}".strip()
        if r.params.get("head_on_device") and "head_on_device" not in rest:  # a placement's own value
            lab += " U-shaped"
        lines[lab].append((hops, meas, r.spread("predicted_step_ms")))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    all_hops: set[float] = set()
    for i, (lab, pts) in enumerate(sorted(lines.items())):
        pts.sort(key=lambda p: p[0])
        _errorbar(ax, [(h, m) for h, m, _ in pts], label=f"{lab} (measured)", color=_color(i), marker="o")
        pred = [(h, p.median) for h, _, p in pts if p is not None]
        if pred:
            ax.plot(*zip(*pred, strict=True), color=_color(i), linestyle="--", marker="x",
                    label=f"{lab} (predicted)")
        all_hops.update(h for h, _, _ in pts)
    ax.set_xticks(sorted(all_hops))
    ax.set_xlabel("hops after the device (stage servers in the chain)")
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"Step time vs hops: measured ({SPREAD}) and analytic (dashed)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "train_step_vs_hops.png")


def latency_vs_freezing(rows: list[Row], out: Path) -> Path | None:
    """Step time (left) and held-out perplexity after training (right) vs the client's freezing ratio;
    one line per combination of the other swept parameters (cut, bandwidth)."""
    rows = [r for r in _rows(rows) if "freeze_client" in r.params]
    if len({r.params["freeze_client"] for r in rows}) < 2:
        return None
    lines: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        lines[r.label(skip=("freeze_client",))].append(r)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for i, (lab, rs) in enumerate(sorted(lines.items())):
        rs.sort(key=lambda r: r.params["freeze_client"])
        lat = [(r.params["freeze_client"], s) for r in rs if (s := r.spread("step_ms_mean"))]
        ppl = [(r.params["freeze_client"], s) for r in rs if (s := r.spread("eval_ppl_after"))]
        if lat:
            _errorbar(ax, lat, label=lab, color=_color(i), marker="o")
        if ppl:
            _errorbar(ax2, ppl, label=lab, color=_color(i), marker="s")
    ax.set_ylabel("step time (ms)")
    ax2.set_ylabel("held-out perplexity after training")
    for a in (ax, ax2):
        a.set_xlabel("client freezing ratio (share of the device's layers without adapters)")
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"Latency and perplexity vs freezing ratio; {SPREAD}")
    return _save(fig, out / "train_latency_vs_freezing.png")


def plots(rows: list[Row], out: Path) -> list[Path]:
    made = [loss_vs_wallclock(rows, out), loss_vs_bytes(rows, out), step_vs_hops(rows, out),
            latency_vs_freezing(rows, out)]
    return [p for p in made if p is not None]


def placement(record: dict[str, Any]) -> str:
    """A training record's placement as run: ``phone=0:4,mec=4:30``, and where the U-shape keeps the
    final norm, head and loss on the device, ``+ head on phone``."""
    t = record.get("training") or {}
    text = t.get("placement") or record.get("placement") or "-"
    if t.get("head_on_device"):
        text += f" + head on {text.partition('=')[0]}"
    return f"`{text}`"


def write_summary(out_dir: Path, rows: list[Row], records: list[dict[str, Any]], pngs: list[Path]) -> Path:
    """``summary.md`` of a training suite: one table row per point, the plots listed."""
    ok = [r for r in records if r.get("status") == "ok"]
    suite = (ok[0] if ok else records[0]).get("suite", out_dir.name)
    lines = [f"# Results: {suite} (training)", "",
             f"{len(records)} records ({len(ok)} ok, {len(records) - len(ok)} failed), {len(rows)} points, "
             f"from `{out_dir / 'results.jsonl'}`.", "",
             f"Each cell is the **{SPREAD_SHORT}** over the successful repeats. Step time: mean over the "
             "steps of a repeat; predicted: the analytic schedule model (stage compute + transfers + "
             "bubble) from that repeat's measured compute and bytes; bytes on the device's link per step; "
             "perplexity on each client's held-out text, pooled.  Placement: the device first; `+ head on "
             "DEVICE`: U-shaped (the device also holds the final norm, head and loss).", "",
             f"| point | runs | placement | hops | step ms, {SPREAD_SHORT} | predicted ms | tokens/s "
             "| up B/step | down B/step | loss first → last | ppl before → after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.ok:
            lines.append(f"| {r.point} | 0/{len(r.records)} | failed: {r.errors[0][:80]} |" + " |" * 8)
            continue
        loss = f"{cell(r.spread('loss_first'), '{:.3f}')} → {cell(r.spread('loss_last'), '{:.3f}')}"
        ppl = f"{cell(r.spread('eval_ppl_before'))} → {cell(r.spread('eval_ppl_after'))}"
        lines.append(f"| {r.point} | {len(r.ok)}/{len(r.records)} | {placement(r.ok[0])} "
                     f"| {cell(r.spread('hops'), '{:.0f}')} "
                     f"| {cell(r.spread('step_ms_mean'))} | {cell(r.spread('predicted_step_ms'))} "
                     f"| {cell(r.spread('tokens_per_s'), '{:.0f}')} "
                     f"| {cell(r.spread('bytes_up_per_step'), '{:.0f}')} "
                     f"| {cell(r.spread('bytes_down_per_step'), '{:.0f}')} | {loss} | {ppl} |")
    lines += ["", "## Plots", ""] + [f"- ![{p.stem}]({p.name})" for p in pngs] + [""]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines))
    return path
