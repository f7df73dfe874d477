"""Figures and the summary of caching suites (records with a ``caching`` part).

Each plotted point and table cell is the median over the successful repeats with their range, as
everywhere in the reports; a caching suite's repeats draw different workloads (seed + repeat), so
the range is that over workloads.  The TTFT CDF pools each repeat's distribution (its recorded
quantiles, equally weighted), as per-token latencies pool every step elsewhere.  The greedy
(trimcaching) is set against the optimum (optimal, the MILP) repeat by repeat: both runs of a repeat
serve the same requests.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from testbed.report.data import SPREAD, SPREAD_SHORT, Row, Spread, cell  # noqa: E402
from testbed.report.plots import SPLIT_COLORS, _errorbar, _save  # noqa: E402

POLICY_COLORS = {"lru": "tab:red", "lfu": "tab:orange", "random": "tab:gray", "block-lru": "tab:blue",
                 "trimcaching": "tab:green", "optimal": "black"}
CAPACITY_KEYS = ("capacity_bases", "capacity_mb")
GREEDY, OPTIMUM = "trimcaching", "optimal"
MAX_CDF_PANELS = 4
LINESTYLES = ("-", "--", ":", "-.")


def is_caching(records: list[dict[str, Any]]) -> bool:
    return any("caching" in r for r in records)


def _rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.ok and "caching" in r.ok[0]]


def _color(policy: str, i: int) -> str:
    return POLICY_COLORS.get(policy, SPLIT_COLORS[i % len(SPLIT_COLORS)])


def _in_bases(rows: list[Row]) -> bool:
    return all("capacity_bases" in r.params for r in rows)


def capacity(row: Row, bases: bool) -> float:
    """The row's capacity per edge: in base models, or in MB."""
    if bases:
        return float(row.params["capacity_bases"])
    return float(row.ok[0]["metrics"]["capacity_bytes"]) / 1e6


def _capacity_label(bases: bool) -> str:
    return "capacity per edge (fp32 base models)" if bases else "capacity per edge (MB)"


def _styles(lines: dict[str, list[Row]]) -> dict[str, dict[str, Any]]:
    """Each line's color (its policy's) and line style (told apart where a policy has several lines)."""
    seen: dict[str, int] = defaultdict(int, {OPTIMUM: 1})  # dashed: greedy and optimum often coincide
    out = {}
    for i, (lab, rs) in enumerate(lines.items()):
        policy = rs[0].placement_name
        out[lab] = {"color": _color(policy, i), "linestyle": LINESTYLES[seen[policy] % len(LINESTYLES)]}
        seen[policy] += 1
    return out


def byte_unit(values: list[float]) -> tuple[float, str]:
    """(scale, name) that shows the largest of ``values`` (bytes) in GB, or in MB below 1 GB."""
    return (1e-9, "GB") if max(values, default=0.0) >= 1e9 else (1e-6, "MB")


def _lines(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows by line: the policy and the swept parameters but the capacity, each line sorted by capacity."""
    bases = _in_bases(rows)
    lines: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        lines[r.label(skip=CAPACITY_KEYS)].append(r)
    for rs in lines.values():
        rs.sort(key=lambda r: capacity(r, bases))
    return dict(lines)


def hit_ratio_vs_capacity(rows: list[Row], out: Path) -> Path | None:
    """Hit ratio (left) and byte hit ratio (right) against each edge's capacity, one line per policy."""
    rows = _rows(rows)
    if not rows:
        return None
    bases = _in_bases(rows)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    lines = _lines(rows)
    styles = _styles(lines)
    for lab, rs in lines.items():
        for a, key in ((ax, "hit_ratio"), (ax2, "byte_hit_ratio")):
            pts = [(capacity(r, bases), s) for r in rs if (s := r.spread(key))]
            if pts:
                _errorbar(a, pts, label=lab, marker="o", **styles[lab])
    ax.set_ylabel("hit ratio (requests served from the edge's store)")
    ax2.set_ylabel("byte hit ratio (bytes of the requested models present)")
    for a in (ax, ax2):
        a.set_xlabel(_capacity_label(bases))
        a.set_ylim(-0.02, 1.02)
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"Hit ratio vs capacity per policy; {SPREAD}")
    return _save(fig, out / "cache_hit_ratio_vs_capacity.png")


def backhaul_per_policy(rows: list[Row], out: Path) -> Path | None:
    """Bytes over the backhaul (from the repository) and between edges, per policy: one bar per capacity."""
    rows = _rows(rows)
    if not rows:
        return None
    bases = _in_bases(rows)
    lines = _lines(rows)
    caps = sorted({capacity(r, bases) for r in rows})
    width = 0.8 / len(caps)
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for a, key, what in ((axes[0], "backhaul_bytes", "backhaul (repository -> edges)"),
                         (axes[1], "edge_to_edge_bytes", "edge to edge")):
        scale, unit_name = byte_unit([r.median(key) or 0.0 for r in rows])
        for j, cap in enumerate(caps):
            xs, hs, lo, hi = [], [], [], []
            for i, rs in enumerate(lines.values()):
                s = next((r.spread(key) for r in rs if capacity(r, bases) == cap), None)
                if s is None:
                    continue
                s = s.scaled(scale)
                xs.append(i - 0.4 + width * (j + 0.5))
                hs.append(s.median)
                lo.append(s.median - s.lo)
                hi.append(s.hi - s.median)
            unit = "bases" if bases else "MB"
            a.bar(xs, hs, width=width, yerr=np.array([lo, hi]), capsize=2,
                  color=cmap(j / max(1, len(caps) - 1) * 0.9), label=f"{cap:g} {unit}")
        a.set_xticks(range(len(lines)))
        a.set_xticklabels(list(lines), rotation=20, ha="right", fontsize=8)
        a.set_ylabel(f"{what}, {unit_name} per run")
        meds = [r.median(key) or 0.0 for r in rows]
        if min(meds) > 0:
            a.set_yscale("log")
        elif max(meds) > 0:  # some zero (an edge that never needed a neighbour): log above 10 MB
            a.set_yscale("symlog", linthresh=0.01)
        a.grid(True, axis="y", alpha=0.3)
        a.legend(fontsize=7, title="capacity per edge", title_fontsize=7)
    fig.suptitle(f"Bytes moved per policy (prefetches included); {SPREAD}")
    return _save(fig, out / "cache_backhaul_per_policy.png")


def pooled_ttft(row: Row) -> np.ndarray:
    """Every successful repeat's TTFT quantiles together, sorted (each repeat weighs the same)."""
    vals = [v for r in row.ok for v in r["caching"].get("ttft_ms_quantiles") or []]
    return np.sort(np.asarray(vals, dtype=float))


def ttft_cdf(rows: list[Row], out: Path) -> Path | None:
    """The CDF of time to first token (fetch included), one panel per capacity, one line per policy."""
    rows = [r for r in _rows(rows) if pooled_ttft(r).size]
    if not rows:
        return None
    bases = _in_bases(rows)
    caps = sorted({capacity(r, bases) for r in rows})
    if len(caps) > MAX_CDF_PANELS:  # the smallest, the largest and evenly between
        caps = [caps[int(round(k))] for k in np.linspace(0, len(caps) - 1, MAX_CDF_PANELS)]
    fig, axes = plt.subplots(1, len(caps), figsize=(4.5 * len(caps) + 1, 4.5), squeeze=False)
    lines = _lines(rows)
    styles = _styles(lines)
    for ax, cap in zip(axes[0], caps, strict=True):
        for lab, rs in lines.items():
            r = next((r for r in rs if capacity(r, bases) == cap), None)
            if r is None:
                continue
            v = pooled_ttft(r)
            ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=lab, **styles[lab])
        ax.set_xscale("log")
        ax.set_xlabel("time to first token, fetch included (ms)")
        ax.set_title(f"capacity {cap:g} {'bases' if bases else 'MB'}", fontsize=9)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("share of requests")
    fig.suptitle("TTFT CDF per policy (every repeat pooled)")
    return _save(fig, out / "cache_ttft_cdf.png")


def _pair_key(row: Row) -> str:
    return json.dumps({k: v for k, v in row.params.items() if k != "policy"}, sort_keys=True, default=str)


def greedy_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(greedy, optimum) rows that differ only in their policy."""
    rows = _rows(rows)
    opt = {_pair_key(r): r for r in rows if r.placement_name == OPTIMUM}
    return [(g, opt[_pair_key(g)]) for g in rows if g.placement_name == GREEDY and _pair_key(g) in opt]


def greedy_ratio(greedy: Row, optimum: Row, key: str = "hit_ratio") -> Spread | None:
    """The greedy's figure over the optimum's, repeat by repeat (the same requests), median and range."""
    g = {r["repeat"]: r["metrics"].get(key) for r in greedy.ok}
    o = {r["repeat"]: r["metrics"].get(key) for r in optimum.ok}
    return Spread.of([g[k] / o[k] for k in g if k in o and g[k] is not None and o[k]])


def greedy_vs_optimum(rows: list[Row], out: Path) -> Path | None:
    """Hit ratio of the greedy and of the MILP optimum vs capacity (left) and their ratio (right)."""
    pairs = greedy_pairs(rows)
    if not pairs:
        return None
    bases = _in_bases([r for p in pairs for r in p])
    lines: dict[str, list[tuple[Row, Row]]] = defaultdict(list)
    for g, o in pairs:
        lines[" ".join(g.label(skip=CAPACITY_KEYS).split(" ")[1:])].append((g, o))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for i, (rest, ps) in enumerate(sorted(lines.items())):
        ps.sort(key=lambda p: capacity(p[0], bases))
        suffix = f" {rest}" if rest else ""
        style = {"linestyle": "-" if i == 0 else "--"}
        for which, row_of in ((GREEDY, 0), (OPTIMUM, 1)):
            pts = [(capacity(p[0], bases), s) for p in ps if (s := p[row_of].spread("hit_ratio"))]
            _errorbar(ax, pts, label=f"{which}{suffix}", color=POLICY_COLORS[which], marker="o", **style)
        ratio = [(capacity(g, bases), s) for g, o in ps if (s := greedy_ratio(g, o))]
        if ratio:
            _errorbar(ax2, ratio, label=f"trimcaching / optimal{suffix}", color=SPLIT_COLORS[i % 7],
                      marker="s")
    ax.set_ylabel("hit ratio")
    ax2.set_ylabel("greedy hit ratio / optimum's (same requests)")
    ax2.axhline(0.95, color="tab:red", linestyle=":", label="within 5 %")
    ax2.axhline(1.0, color="black", linewidth=0.8)
    for a in (ax, ax2):
        a.set_xlabel(_capacity_label(bases))
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"Greedy placement (trimcaching) vs the MILP optimum; {SPREAD}")
    return _save(fig, out / "cache_greedy_vs_optimum.png")


def plots(rows: list[Row], out: Path) -> list[Path]:
    made = [hit_ratio_vs_capacity(rows, out), backhaul_per_policy(rows, out), ttft_cdf(rows, out),
            greedy_vs_optimum(rows, out)]
    return [p for p in made if p is not None]


def _scaled(s: Spread | None, k: float) -> Spread | None:
    return None if s is None else s.scaled(k)


def write_summary(out_dir: Path, rows: list[Row], records: list[dict[str, Any]], pngs: list[Path]) -> Path:
    """``summary.md`` of a caching suite: one table row per point, greedy vs optimum, the plots listed."""
    ok = [r for r in records if r.get("status") == "ok"]
    suite = (ok[0] if ok else records[0]).get("suite", out_dir.name)
    crows = _rows(rows)
    bases = bool(crows) and _in_bases(crows)
    generated = {(r["metrics"].get("generated_variants"), r["metrics"].get("models")) for r in ok}
    gen = "; ".join(f"{g} of {m} models" for g, m in sorted(generated, key=str))
    moved = [r.median(k) or 0.0 for r in crows for k in ("backhaul_bytes", "edge_to_edge_bytes")]
    scale, unit = byte_unit(moved)
    lines = [f"# Results: {suite} (caching)", "",
             f"{len(records)} records ({len(ok)} ok, {len(records) - len(ok)} failed), {len(rows)} points, "
             f"from `{out_dir / 'results.jsonl'}`.", "",
             f"Generated variants (from a seed, not trained): {gen or '-'}.", "",
             f"Each cell is the **{SPREAD_SHORT}** over the successful repeats, each repeat its own "
             "workload (seed + repeat).  Hit ratio: requests whose model was whole in the edge's store; "
             "backhaul: bytes from the repository; edge to edge: bytes between edges (prefetches "
             "included in both); TTFT includes the fetch.", "",
             f"| point | runs | mode | capacity MB | hit ratio | byte hit ratio | backhaul {unit} "
             f"| edge-to-edge {unit} | fetch ms mean | TTFT p50 ms | TTFT p95 ms | evicted blocks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.ok:
            lines.append(f"| {r.point} | 0/{len(r.records)} | failed: {r.errors[0][:80]} |" + " |" * 9)
            continue
        cap = r.spread("capacity_bytes")
        lines.append(
            f"| {r.point} | {len(r.ok)}/{len(r.records)} | {r.params.get('cache_mode', '-')} "
            f"| {cell(cap.scaled(1e-6) if cap else None, '{:.0f}')} "
            f"| {cell(r.spread('hit_ratio'), '{:.3f}')} | {cell(r.spread('byte_hit_ratio'), '{:.3f}')} "
            f"| {cell(_scaled(r.spread('backhaul_bytes'), scale), '{:.2f}')} "
            f"| {cell(_scaled(r.spread('edge_to_edge_bytes'), scale), '{:.2f}')} "
            f"| {cell(r.spread('fetch_ms_mean'), '{:.0f}')} | {cell(r.spread('ttft_ms_p50'), '{:.0f}')} "
            f"| {cell(r.spread('ttft_ms_p95'), '{:.0f}')} | {cell(r.spread('evictions'), '{:.0f}')} |")
    pairs = greedy_pairs(rows)
    if pairs:
        lines += ["", "## Greedy vs optimum", "",
                  "trimcaching's hit ratio over optimal's (the MILP), repeat by repeat on the same requests.",
                  "", f"| point | trimcaching hit ratio | optimal hit ratio | ratio, {SPREAD_SHORT} |",
                  "|---|---|---|---|"]
        for g, o in sorted(pairs, key=lambda p: capacity(p[0], bases)):
            point = g.point.partition("/")[2] or g.point
            lines.append(f"| {point} | {cell(g.spread('hit_ratio'), '{:.3f}')} "
                         f"| {cell(o.spread('hit_ratio'), '{:.3f}')} "
                         f"| {cell(greedy_ratio(g, o), '{:.3f}')} |")
    lines += ["", "## Plots", ""] + [f"- ![{p.stem}]({p.name})" for p in pngs] + [""]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines))
    return path
